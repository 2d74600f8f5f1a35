"""What a worker runs: every procedure workflow and every activity, by task queue role."""

from activities import (
    analysis,
    database,
    http_checks,
    kubernetes,
    maintenance,
    notify,
    prometheus,
    reports,
    restore,
    routers,
    rules,
    statuspage,
    temporal_queues,
    traffic,
    workloads,
)
from opsflow.procedures import workflow_classes

WORKFLOWS = workflow_classes()  # the one list of procedures (opsflow/procedures.py)

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
    database.db_drain,
    database.db_shut_down,
    database.db_start,
    database.db_follow,
    traffic.traffic_status,
    traffic.traffic_switch,
    traffic.traffic_prepare,
    kubernetes.kube_status,
    kubernetes.set_maintenance,
    kubernetes.scale_up,
    kubernetes.scale_to_zero,
    kubernetes.lower_autoscalers,
    http_checks.smoke,
    restore.restore_window,
    restore.restore_leftovers,
    restore.restore_start,
    restore.restore_wait,
    restore.restore_delete,
    restore.validate_checks,
    restore.verify,
    restore.restore_mysql_dump,
    maintenance.plan, maintenance.run_item, maintenance.health, maintenance.take_backup, maintenance.verify_backup,
]
# Activities that belong to no region run beside the workflows.
GLOBAL_ACTIVITIES = [
    rules.worker_inventory,
    notify.send,
    reports.store_report,
    reports.drill_history,
    temporal_queues.unserved_queues,
    statuspage.update,
    maintenance.watch,
    maintenance.judge_app,
]

# Rollouts (canary, blue-green): Kubernetes and the region's Prometheus on the app's region queue.
# Also on a router's own queue (the worker on the NGINX host, `opsflow worker --router-queue`): the router and the
# app's workload activities, chosen by kind (activities/routers.py, activities/workloads.py).
ROUTER_ACTIVITIES = [
    routers.router_status,
    routers.router_set_weight,
    workloads.rollout_status,
    workloads.create_canary,
    workloads.scale_canary,
    workloads.delete_canary,
    workloads.set_image,
]
REGION_ACTIVITIES += [http_checks.checks, *ROUTER_ACTIVITIES]
REGION_ACTIVITIES += [
    kubernetes.set_weight,
    kubernetes.create_colour,
    kubernetes.switch_service,
    kubernetes.scale_deployment,
    prometheus.samples,
    analysis.judge_step,
]
