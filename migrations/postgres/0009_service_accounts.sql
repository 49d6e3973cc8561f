-- Service accounts: non-login owners of a team's keys (automation).

CREATE TABLE service_accounts (
    workspace_id       TEXT NOT NULL,
    service_account_id TEXT NOT NULL,
    team_id            TEXT NOT NULL,
    name               TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    PRIMARY KEY (workspace_id, service_account_id)
);
