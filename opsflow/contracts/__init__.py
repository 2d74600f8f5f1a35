"""Every activity's contract, declared once, one module per domain (db, traffic, k8s, restore, maintenance,
rollout, notify, kernel). Workflows import the declarations; activities/ implement them
(`@DB_STATUS.implementation`); the worker registers the implementations. A new activity: declare it here, implement
it in the provider's module of activities/, add it to worker/registry.py."""
