-- Access groups: named sets of targets per workspace that keys may reference
-- (`api_keys.resource_groups`, space-separated names). Changing a group appends an
-- `updated` event for every key that references it, so every replica reloads them.

CREATE TABLE access_groups (
    workspace_id TEXT NOT NULL,
    name         TEXT NOT NULL,
    targets      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, name)
);

ALTER TABLE api_keys ADD COLUMN resource_groups TEXT NOT NULL DEFAULT '';
