-- When a key's periodic budget next starts again (NULL: a lifetime budget), so that a
-- sweeper can find the keys whose period turned, start their stored spend again and put
-- the reset on the event log and in the audit log.

ALTER TABLE api_keys ADD COLUMN budget_resets_at BIGINT;
CREATE INDEX api_keys_budget_resets ON api_keys (budget_resets_at) WHERE budget_resets_at IS NOT NULL;
