"""Every call opsflow makes to Azure, through Azure Resource Manager, one concern per module: `arm`
(credentials, clients, errors, long-running operations), `flexible_server` (DatabaseProvider and backups),
`traffic_manager` (TrafficProvider), `restore` (the restore drill's point-in-time restore)."""


