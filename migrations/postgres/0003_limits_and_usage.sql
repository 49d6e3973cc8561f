-- Rate limits, budgets and usage.
--
-- `rate_limits`: the key's own limits as text (`requests/minute=100 tokens/day=1000000`);
-- empty means the deployment's default applies. `spent_micros` and `last_used_at` are
-- written by each replica's usage book in batches (never a write per VerifyKey).

ALTER TABLE api_keys ADD COLUMN rate_limits TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN max_budget_micros BIGINT;
ALTER TABLE api_keys ADD COLUMN spent_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;

CREATE INDEX api_keys_by_last_use ON api_keys (workspace_id, last_used_at);
