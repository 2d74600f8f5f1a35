"""Every call opsflow makes to AWS, one concern per module: `session` (clients, errors, polling), `rds`
(DatabaseProvider), `route53` (TrafficProvider), `rds_restore` and `dump_restore` (RestoreProviders for the
restore drill), `reports` (reports into S3)."""


