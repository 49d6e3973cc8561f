-- Webhooks: a workspace's endpoints, the outbox they are delivered from, and the marks
-- that make each expiry and budget notice go out once.

-- An endpoint. Its signing secret is envelope-encrypted as provider keys are (bound to
-- the webhook id). `delivered_seq` is its cursor in its workspace's outbox: every event
-- at or below it was delivered (or is not one it subscribes to). While deliveries fail,
-- `failing_since` holds the first failure, `failures` the count in a row and
-- `next_attempt_at` the next try; after 24 hours of failures `disabled_at` is set.
CREATE TABLE webhook_endpoints (
    webhook_id      TEXT PRIMARY KEY,
    workspace_id    TEXT NOT NULL,
    url             TEXT NOT NULL,
    event_types     TEXT NOT NULL,
    kek_version     BIGINT NOT NULL,
    wrapped_dek     BLOB NOT NULL,
    ciphertext      BLOB NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    delivered_seq   BIGINT NOT NULL,
    failing_since   BIGINT,
    failures        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT NOT NULL DEFAULT '',
    disabled_at     BIGINT
);

CREATE INDEX webhook_endpoints_by_workspace ON webhook_endpoints (workspace_id);

-- Each workspace's outbox head. A mutation that announces an event takes the next seq
-- from its workspace's row inside its own transaction: the row's lock is held until
-- commit, so seq order is commit order within a workspace (the only order deliveries
-- follow) and workspaces never wait on each other.
CREATE TABLE webhook_heads (
    workspace_id TEXT PRIMARY KEY,
    head         BIGINT NOT NULL
);

-- The outbox: one row per announced event of a workspace that has endpoints, written in
-- the transaction of the mutation it announces, its payload's `data` as JSON.
CREATE TABLE webhook_events (
    workspace_id TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    event_type   TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    data         TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, seq)
);

-- The notices already announced for a key (`expiring:<lead seconds>`,
-- `budget:<percent>:<period start>`): each is announced once.
CREATE TABLE webhook_notices (
    key_id  TEXT NOT NULL,
    notice  TEXT NOT NULL,
    sent_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, notice)
);

-- What the notice sweeps read, every minute by default: live keys by expiry (a range
-- from now to the longest lead), and live keys with a budget by workspace.
CREATE INDEX api_keys_expiring ON api_keys (expires_at)
    WHERE expires_at IS NOT NULL AND revoked_at IS NULL AND deleted_at IS NULL;
CREATE INDEX api_keys_budgeted ON api_keys (workspace_id)
    WHERE max_budget_micros IS NOT NULL AND revoked_at IS NULL AND deleted_at IS NULL;
