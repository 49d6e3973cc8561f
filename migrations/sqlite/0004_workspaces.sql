-- Workspaces (tenants) become stored entities with a plan. Keys issued before this
-- migration named free-form workspace ids: each distinct one becomes a workspace on the
-- free SPARK plan, named after its id, so its keys keep working and it can go on
-- issuing keys (if the deployment's SPARK plan allows them) but cannot store provider
-- keys until an admin moves it to a plan that allows BYOK.

CREATE TABLE workspaces (
    workspace_id TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    plan         TEXT NOT NULL CHECK (plan IN ('spark', 'pro', 'team', 'enterprise')),
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

INSERT INTO workspaces (workspace_id, name, plan, created_at, updated_at)
SELECT workspace_id, workspace_id, 'spark', MIN(created_at), MIN(created_at)
FROM api_keys GROUP BY workspace_id;
