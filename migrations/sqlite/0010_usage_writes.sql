-- Usage writes without index churn.
--
-- Every replica's usage book rewrites `last_used_at` in batches, at most once a minute
-- per key in use; an index naming it made each of those writes an index write too. No
-- query needs it (ListKeys' "unused since" filter pages along api_keys_by_workspace).

DROP INDEX IF EXISTS api_keys_by_last_use;
