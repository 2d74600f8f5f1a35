"""`opsflow`: start procedures, talk to running ones, read reports, run the lab and the worker.

Every command takes --json. Exit codes: 0 success, 1 the procedure/operation failed or was refused by
the workflow, 2 bad input (nothing changed), 3 another procedure is already running on the environment.

This module builds the top parser, lets each command module add its subcommands (`register(sub)`: a parser
per command, with `func=` its handler beside it), runs the handler, and turns errors into exit codes. A new
command goes in the module of its kind, or a new module added to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys

from temporalio.service import RPCError

from opsflow.client import ClientError
from opsflow.codec import CodecConfigError
from opsflow.inventory import InventoryError
from starters import alerts, control, local, maintenance, recovery, rollout, schedules, security, status
from starters.common import SigningFailed

# In the order `opsflow --help` lists their commands.
COMMAND_MODULES = (
    local,  # lab, worker
    recovery,  # failover, failback, drill
    control,  # approve, reject, pause, resume, abort, override
    status,  # status, report, list
    schedules,  # schedule create|list|describe|pause|unpause|trigger|backfill|delete
    security,  # verify-report, codec-key, codec-server
    rollout,  # canary, bluegreen, promote, rollback
    maintenance,  # maintenance
    alerts,  # alert-receiver
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsflow", description="Durable operations procedures on Temporal.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        return asyncio.run(code) if inspect.isawaitable(code) else code
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except (InventoryError, SigningFailed, CodecConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RPCError as e:
        print(f"error: Temporal: {e.message}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError, RuntimeError) as e:
        if "connect" in str(e).lower() or "transport" in str(e).lower():
            print(f"error: cannot reach Temporal ({e}); is the lab up (opsflow lab up) or TEMPORAL_ADDRESS set?",
                  file=sys.stderr)
            return 1
        raise


def entry() -> None:
    """The console script. Exits without interpreter shutdown: a short-lived temporalio client can abort
    while Python finalizes (temporalio/sdk-python#300), losing piped --json output."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
