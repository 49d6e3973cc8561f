-- Keys, their secrets (hashes only) and the audit log.
-- Times are unix microseconds (BIGINT) in both stores, so both order and compare alike.

CREATE TABLE api_keys (
    key_id        TEXT COLLATE "C" PRIMARY KEY,  -- byte order, as SQLite sorts
    workspace_id  TEXT NOT NULL,
    name          TEXT NOT NULL,
    environment   TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    display       TEXT NOT NULL,
    scopes        TEXT NOT NULL,          -- space-separated, sorted
    owner_kind    TEXT NOT NULL CHECK (owner_kind IN ('user', 'service_account')),
    owner_id      TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    metadata      TEXT NOT NULL,          -- JSON object of strings
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    revoked_at    BIGINT,
    revoke_reason TEXT,
    rotated_at    BIGINT,
    deleted_at    BIGINT
);

CREATE INDEX api_keys_by_workspace ON api_keys (workspace_id, created_at DESC, key_id DESC);
CREATE INDEX api_keys_by_owner ON api_keys (workspace_id, owner_kind, owner_id);

-- Every secret a key has had: the current one (valid_until NULL) and those a rotation
-- replaced (valid until the end of their grace period). Only SHA-256 hashes.
CREATE TABLE key_secrets (
    secret_hash BYTEA PRIMARY KEY CHECK (length(secret_hash) = 32),
    key_id      TEXT COLLATE "C" NOT NULL REFERENCES api_keys (key_id),
    created_at  BIGINT NOT NULL,
    valid_until BIGINT
);

CREATE INDEX key_secrets_by_key ON key_secrets (key_id);

CREATE TABLE audit_events (
    id           BIGSERIAL PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    actor_id     TEXT NOT NULL,
    caller       TEXT NOT NULL,
    action       TEXT NOT NULL,
    key_id       TEXT,
    outcome      TEXT NOT NULL CHECK (outcome IN ('success', 'denied')),
    detail       TEXT NOT NULL,
    occurred_at  BIGINT NOT NULL
);

CREATE INDEX audit_events_by_workspace ON audit_events (workspace_id, id DESC);
