-- The durable event log that edge nodes and other replicas follow.
--
-- `seq` is taken from the single `event_log` row, updated inside the mutation's own
-- transaction: the row lock serializes event writers until they commit, so seq order
-- is commit order and there are no gaps (a rolled-back mutation rolls its seq back too).
-- A reader that has seen seq N has seen every event up to N.

CREATE TABLE event_log (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    head           BIGINT NOT NULL,       -- the last seq handed out (and committed)
    pruned_through BIGINT NOT NULL        -- every seq <= this one may be gone
);

INSERT INTO event_log (id, head, pruned_through) VALUES (1, 0, 0);

CREATE TABLE key_events (
    seq          BIGINT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('revoked', 'rotated', 'updated', 'deleted')),
    key_id       TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    key_hash     BYTEA NOT NULL,          -- the secret the event is about (old one for a rotation)
    stale_hashes TEXT NOT NULL,           -- hex of every secret hash a cache must drop, space-separated
    occurred_at  BIGINT NOT NULL
);

CREATE INDEX key_events_by_time ON key_events (occurred_at);

-- Whether the end of a rotated-away secret's grace period has been announced.
ALTER TABLE key_secrets ADD COLUMN end_announced INTEGER NOT NULL DEFAULT 0;

CREATE INDEX key_secrets_grace_ends ON key_secrets (valid_until) WHERE valid_until IS NOT NULL AND end_announced = 0;
