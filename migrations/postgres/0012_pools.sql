-- Pools: rate limits shared by every key of a workspace, a team or an owner (a user or a
-- service account within a workspace), as text like a key's own (`requests/minute=100`);
-- empty means no pool. A change reloads the keys it covers, as a plan change does.

ALTER TABLE workspaces ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '';
ALTER TABLE teams ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '';

CREATE TABLE owner_limits (
    workspace_id TEXT NOT NULL,
    owner_kind   TEXT NOT NULL CHECK (owner_kind IN ('user', 'service_account')),
    owner_id     TEXT NOT NULL,
    rate_limits  TEXT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, owner_kind, owner_id)
);
