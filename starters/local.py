"""`opsflow lab` and `opsflow worker`: what runs on this machine. The `lab` subcommand is the only way from the
CLI into lab/ (the rehearsal environment); a production image ships without it, and then says so."""

from __future__ import annotations

import argparse

from opsflow.client import ClientError
from worker.main import add_arguments as worker_arguments
from worker.main import run_from_args as run_worker

try:  # an optional part: a source checkout has lab/, the production image (Dockerfile) does not
    from lab import cli as lab_cli
except ImportError:
    lab_cli = None


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the local rehearsal lab: up, status, down")
    if lab_cli is None:
        lab.add_argument("lab_command", nargs="?", help="(the lab is not installed here)")
    else:
        lab_cli.add_arguments(lab)
    lab.set_defaults(func=cmd_lab)
    worker = sub.add_parser("worker", help="run a worker for the inventory's task queues")
    worker_arguments(worker)
    worker.set_defaults(func=run_worker)


def cmd_lab(args: argparse.Namespace) -> int:
    if lab_cli is None:
        raise ClientError("the lab is not installed here (it ships in a source checkout: pip install -e '.[lab]')")
    return lab_cli.main(args)
