-- What a key may reach: resources by mode (all / include / exclude) and list
-- (space-separated target names), and the networks its calls may come from
-- (space-separated CIDR ranges; empty: anywhere).

ALTER TABLE api_keys ADD COLUMN resource_mode TEXT NOT NULL DEFAULT 'all';
ALTER TABLE api_keys ADD COLUMN resource_targets TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN allowed_cidrs TEXT NOT NULL DEFAULT '';
