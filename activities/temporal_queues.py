"""Temporal itself: which task queues have a worker polling them (DescribeTaskQueue).

A procedure asks before it changes anything, so a step on a queue nobody serves is refused up front
instead of waiting for a worker that never comes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from temporalio import activity
from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from opsflow.contracts.kernel import TEMPORAL_UNSERVED_QUEUES

# A worker long-polls for up to ~70 s, so a live poller may not have been seen for that long; one silent
# for longer than this is taken as gone.
POLLER_FRESH = timedelta(seconds=90)


async def queue_pollers(client, queue: str, kinds=(TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,)) -> list[str]:
    """Identities of the workers that polled `queue` recently (for any of `kinds`)."""
    now = datetime.now(timezone.utc)
    seen: list[str] = []
    for kind in kinds:
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                task_queue_type=kind,
            )
        )
        for p in resp.pollers:
            last = p.last_access_time.ToDatetime(tzinfo=timezone.utc) if p.HasField("last_access_time") else now
            if now - last <= POLLER_FRESH:
                seen.append(p.identity)
    return seen


@TEMPORAL_UNSERVED_QUEUES.implementation
async def unserved_queues(queues: list[str]) -> list[str]:
    """The queues (of those given) that no worker polls for activities."""
    client = activity.client()
    return [q for q in queues if not await queue_pollers(client, q)]
