"""activities/commands.run_bounded, with real programs: output and stdin, a program that does not answer in time,
one that cannot start."""

from __future__ import annotations

import os
import time

import pytest
from temporalio.exceptions import ApplicationError

from activities.commands import run_bounded

ENV = dict(os.environ)


def test_output_and_exit_status_come_back_with_stdin_written():
    p = run_bounded(["sh", "-c", "cat; echo oops >&2; exit 4"], "cat", 10, env=ENV, input="line one\n")
    assert p.returncode == 4
    assert p.stdout.splitlines() == ["line one", "oops"]


def test_a_program_that_does_not_answer_in_time_is_killed_and_named():
    t0 = time.monotonic()
    with pytest.raises(ApplicationError) as e:
        run_bounded(["sleep", "30"], "sleep on the host", 0.3, env=ENV)
    assert e.value.type == "HostCommandTimeout" and "sleep on the host: no answer after" in e.value.message
    assert time.monotonic() - t0 < 5  # killed, not waited for


def test_a_program_that_cannot_start_is_not_retried():
    with pytest.raises(ApplicationError) as e:
        run_bounded(["/nonexistent/pg_ctl", "status"], "pg_ctl status", 5, env=ENV)
    assert e.value.type == "HostCommandFailed" and e.value.non_retryable and "/nonexistent/pg_ctl" in e.value.message


def test_a_long_output_does_not_block_the_program():
    p = run_bounded(["sh", "-c", "seq 1 200000"], "seq", 30, env=ENV)  # ~1.3 MB, more than a pipe holds
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "200000"
