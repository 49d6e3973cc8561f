-- Usage history: per key, per hour and per day (`granularity`), what was admitted,
-- refused (one column per reason), and the tokens and spend reported. Written in
-- batches by each replica (never a write per call), to the hour row and the day row of a
-- key at once; the key's workspace, owner and team are copied in so that every grouping
-- reads this table alone. Pruned by age, hours sooner than days.

CREATE TABLE usage_rollups (
    key_id                      TEXT NOT NULL,
    granularity                 TEXT NOT NULL CHECK (granularity IN ('hour', 'day')),
    bucket_start                BIGINT NOT NULL,
    workspace_id                TEXT NOT NULL,
    owner_kind                  TEXT NOT NULL,
    owner_id                    TEXT NOT NULL,
    team_id                     TEXT NOT NULL,
    admitted                    BIGINT NOT NULL DEFAULT 0,
    refused_rate_limited        BIGINT NOT NULL DEFAULT 0,
    refused_budget_exceeded     BIGINT NOT NULL DEFAULT 0,
    refused_insufficient_scope  BIGINT NOT NULL DEFAULT 0,
    refused_resource_forbidden  BIGINT NOT NULL DEFAULT 0,
    refused_ip_forbidden        BIGINT NOT NULL DEFAULT 0,
    refused_revoked             BIGINT NOT NULL DEFAULT 0,
    refused_expired             BIGINT NOT NULL DEFAULT 0,
    refused_plan_forbids_keys   BIGINT NOT NULL DEFAULT 0,
    tokens                      BIGINT NOT NULL DEFAULT 0,
    spend_micros                BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, granularity, bucket_start)
);

-- A workspace's usage by time (grouped by key, team or workspace), and one owner's (a
-- self-service member reads only its own keys).
CREATE INDEX usage_rollups_by_workspace ON usage_rollups (workspace_id, granularity, bucket_start);
CREATE INDEX usage_rollups_by_owner ON usage_rollups (workspace_id, owner_kind, owner_id, granularity, bucket_start);
-- Pruning by age.
CREATE INDEX usage_rollups_by_age ON usage_rollups (granularity, bucket_start);
