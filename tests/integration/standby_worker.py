"""A worker process started ahead of need, for the crash suites: it does what costs a fresh worker its start (the
interpreter, temporalio, the cloud SDKs, every activity and workflow module: ~1.5 s of CPU, more on a loaded
machine) and then waits for a line on stdin; only then does it run `worker.main` with its arguments, i.e. load the
inventory, connect and poll. A test that SIGKILLs a worker sends the line to a standby at once, so the procedure
waits for the server's timeouts (sticky queue, heartbeat), not for a Python start. EOF on stdin (the test is gone)
ends it without polling.

    python -m tests.integration.standby_worker --env INVENTORY [worker flags]
"""

from __future__ import annotations

import sys

import worker.main
import worker.registry  # noqa: F401  (imports every activity and workflow module: the cost we pay ahead)


def main() -> int:
    if not sys.stdin.readline():
        return 0
    return worker.main.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
