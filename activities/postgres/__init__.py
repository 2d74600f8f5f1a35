"""PostgreSQL over SQL (psycopg 3, synchronous), one concern per module: `connection` (connect, errors),
`server` (status, fence, promote, rebuild check; `PostgresServer`, the DatabaseProvider for self-managed
servers), `divergence` (failback), `integrity` (the restore drill's checks), `maintenance` (VACUUM, ANALYZE,
REINDEX under guards), `backup` (pg_basebackup). The cloud providers (Azure flexible server, RDS) read
replication state over SQL with the same functions."""


