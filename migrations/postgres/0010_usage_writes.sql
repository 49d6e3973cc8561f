-- Usage writes without index churn.
--
-- Every replica's usage book rewrites `last_used_at` and `spent_micros` in batches, at
-- most once a minute per key in use. While an index named `last_used_at`, each of those
-- writes was a non-HOT update: a new entry in every index of api_keys. No query needs
-- that index (ListKeys' "unused since" filter pages along api_keys_by_workspace), so it
-- goes, and pages keep room for the new row version: Postgres then updates in place
-- (a heap-only tuple), touching no index at all.

DROP INDEX IF EXISTS api_keys_by_last_use;
ALTER TABLE api_keys SET (fillfactor = 80);
