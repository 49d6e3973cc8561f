-- Provider keys (BYOK), envelope-encrypted: the ciphertext under a per-secret data key,
-- the data key wrapped by the key-encryption key of version kek_version. Both are
-- nonce || ciphertext || tag, and both are bound to (workspace_id, provider, record_id).

CREATE TABLE provider_keys (
    record_id    TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    provider     TEXT NOT NULL CHECK (provider IN ('anthropic', 'openai')),
    last_four    TEXT NOT NULL,
    kek_version  BIGINT NOT NULL,
    wrapped_dek  BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    UNIQUE (workspace_id, provider)
);

CREATE INDEX provider_keys_by_kek ON provider_keys (kek_version);

-- One check value per KEK version ever used: a KEK configured under a version with
-- another key is found at start, not at the first resolve.
CREATE TABLE kek_checks (
    version     BIGINT PRIMARY KEY,
    check_value BLOB NOT NULL,
    created_at  BIGINT NOT NULL
);
