-- Pool budgets: a spend ceiling shared by every key of a workspace, a team or an owner,
-- stored as text (`MAX`, `MAX/month`, `MAX/days:N@ANCHOR`; empty: none), and the pool's
-- spend with the epoch it counts in, written in batches by the usage book as a key's is.

ALTER TABLE workspaces ADD COLUMN budget TEXT NOT NULL DEFAULT '';
ALTER TABLE workspaces ADD COLUMN spent_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workspaces ADD COLUMN spend_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE teams ADD COLUMN budget TEXT NOT NULL DEFAULT '';
ALTER TABLE teams ADD COLUMN spent_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE teams ADD COLUMN spend_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE owner_limits ADD COLUMN budget TEXT NOT NULL DEFAULT '';
ALTER TABLE owner_limits ADD COLUMN spent_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE owner_limits ADD COLUMN spend_epoch BIGINT NOT NULL DEFAULT 0;
