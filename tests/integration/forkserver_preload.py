"""What the fork server (forked.py) does once so that no forked CLI or worker does it again: import the CLI and the
worker with every activity and workflow module, the cloud SDK modules the activities import on their first call
(the Kubernetes API classes alone cost ~0.6 s of CPU, the Azure management clients as much again), and the worker's
default build id (a hash of every loaded module's code, ~0.2 s, computed once per process and memoised by the SDK)."""

import azure.mgmt.postgresqlflexibleservers  # noqa: F401
import azure.mgmt.trafficmanager  # noqa: F401
import temporalio.envconfig  # noqa: F401
from kubernetes.client import AppsV1Api, CoreV1Api  # noqa: F401
from temporalio.worker._worker import load_default_build_id

import activities.aws.dump_restore  # noqa: F401
import activities.aws.rds_restore  # noqa: F401
import activities.aws.reports  # noqa: F401
import activities.aws.route53  # noqa: F401
import activities.azure.flexible_server  # noqa: F401
import activities.azure.restore  # noqa: F401
import activities.azure.traffic_manager  # noqa: F401
import starters.cli  # noqa: F401
import worker.main  # noqa: F401
import worker.registry  # noqa: F401

load_default_build_id()
