-- Teams inside a workspace, with the policy their self-service keys follow (JSON), and
-- the team a key belongs to (NULL: none).

CREATE TABLE teams (
    workspace_id TEXT NOT NULL,
    team_id      TEXT NOT NULL,
    name         TEXT NOT NULL,
    policy       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, team_id)
);

ALTER TABLE api_keys ADD COLUMN team_id TEXT;

CREATE INDEX api_keys_by_team_owner ON api_keys (workspace_id, team_id, owner_id);
