-- ListAuditEvents filters by key, actor, action and time: each has an index of its own
-- within the workspace, newest first, so an incident review of one key in a workspace
-- with years of events reads only that key's rows.

CREATE INDEX audit_events_by_key ON audit_events (workspace_id, key_id, id DESC);
CREATE INDEX audit_events_by_actor ON audit_events (workspace_id, actor_id, id DESC);
CREATE INDEX audit_events_by_action ON audit_events (workspace_id, action, id DESC);
CREATE INDEX audit_events_by_time ON audit_events (workspace_id, occurred_at);
