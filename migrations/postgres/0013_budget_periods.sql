-- Budgets with a period: `budget_period` is '' (lifetime), 'day', 'week', 'month' (UTC
-- calendar) or 'days:N' (rolling, from the last reset or the key's creation);
-- `budget_reset_at` the last manual reset (0: never); `spend_epoch` the start of the spend
-- epoch `spent_micros` belongs to. A usage write of an epoch newer than the row's starts
-- the row's spend again from it; one of an older epoch changes nothing.

ALTER TABLE api_keys ADD COLUMN budget_period TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN budget_reset_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN spend_epoch BIGINT NOT NULL DEFAULT 0;
