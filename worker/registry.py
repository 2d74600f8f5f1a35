"""What a worker runs: every procedure workflow and every activity, by task queue role."""

from activities import database, http_checks, kubernetes, notify, reports, restore, temporal_queues, traffic
from workflows.drill import DrillWorkflow
from workflows.failback import FailbackWorkflow
from workflows.failover import FailoverWorkflow
from workflows.scheduled import ScheduledLaunch

WORKFLOWS = [FailoverWorkflow, FailbackWorkflow, DrillWorkflow, ScheduledLaunch]

# Activities that act on one region run on that region's queue, so a dead region cannot stall the rest.
REGION_ACTIVITIES = [
    database.db_status,
    database.db_fence,
    database.db_unfence,
    database.db_promote,
    database.db_check_writable,
    database.db_wait_caught_up,
    database.db_rebuild_replica,
    database.db_divergence,
    database.db_fence_control_plane,
    traffic.traffic_status,
    traffic.traffic_switch,
    kubernetes.kube_status,
    kubernetes.set_maintenance,
    kubernetes.scale_up,
    kubernetes.scale_to_zero,
    http_checks.smoke,
    restore.restore_window,
    restore.restore_leftovers,
    restore.restore_start,
    restore.restore_wait,
    restore.restore_delete,
    restore.validate_checks,
    restore.verify,
]
# Activities that belong to no region run beside the workflows.
GLOBAL_ACTIVITIES = [notify.send, reports.store_report, temporal_queues.unserved_queues]
