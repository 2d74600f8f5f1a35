"""The ARM emulator's world, one module per resource type (the HTTPS server and the CLI: lab/arm_emulator.py).

    common.py           ARM's error shape, names, time and SQL helpers
    state.py            ArmState: settings, the servers and profiles, the state file, probes of the clusters
    operations.py       long-running operations (the ARM protocol the SDK's ARMPolling expects)
    flexible.py         flexible servers: bodies, listing, PATCH (tags), configurations
    lifecycle.py        flexible servers: create (PUT) and delete
    replicas.py         read replicas: promotion (standalone, switchover) and Replica creates
    virtual_endpoints.py  virtual endpoints: the writer/reader host names of a replication pair
    backups.py          backups: earliest/latest restore points, point-in-time restores, on-demand backups
    traffic_manager.py  Traffic Manager profiles and endpoints
    keyvault.py         Key Vault's get-secret
    world.py            World: all of the above, the ARM request routing and the ARM admin resources

A new emulated resource type is a module here with a mixin class (its config, bodies and handlers) and a line
in world.py's routing.
"""
