"""No resolved secret value in an activity's failure: values registered when resolved (in the forms libraries
quote them), the worker's interceptor rewriting a failure and its causes, and the real notify/statuspage failures
that quoted a secret, through a real worker on Temporal's test server."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pytest_asyncio
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import ExecuteActivityInput, UnsandboxedWorkflowRunner, Worker

from activities import notify, statuspage
from activities.secrets import resolve
from lab.ports import free_port
from opsflow import scrub
from opsflow.inventory import NotificationChannel, SecretRef
from opsflow.maintenance import StatusPage
from opsflow.maintenance_models import StatusPageRequest
from opsflow.models import Notification, NotifyRequest
from opsflow.scrub import REDACTED, ScrubInterceptor, scrubbed
from opsflow.temporal import DATA_CONVERTER
from tests.conftest import venv_binary

KEY = "sk_live_4f9a1c7e2b"
HOOK = "https://hooks.example/services/T01/B02/Xy7SecretPart"


@pytest.fixture(autouse=True)
def clean_registry():
    scrub.forget_all()
    yield
    scrub.forget_all()


def test_resolve_registers_the_value_in_the_forms_it_is_quoted_in(monkeypatch):
    monkeypatch.setenv("SCRUB_TEST_KEY", KEY + "\n")
    monkeypatch.setenv("SCRUB_TEST_HOOK", HOOK)
    assert scrub.scrub(f"x {KEY} y") == f"x {KEY} y"  # nothing registered yet
    resolve(SecretRef(env="SCRUB_TEST_KEY"))
    resolve(SecretRef(env="SCRUB_TEST_HOOK"))
    for text in [
        f"Illegal header value b'OAuth {KEY}\\n'",  # the stripped form, as httpx/h11 quoted it
        "unknown url type: 'hooks.example/services/T01/B02/Xy7SecretPart'",  # the URL without its scheme
        "URL can't contain control characters. '/services/T01/B02/Xy7SecretPart'",  # its path, as http.client
        "https%3A%2F%2Fhooks.example%2Fservices%2FT01%2FB02%2FXy7SecretPart",  # URL-quoted
    ]:
        assert KEY not in scrub.scrub(text) and "Xy7SecretPart" not in scrub.scrub(text)
        assert REDACTED in scrub.scrub(text)


def test_short_values_are_not_scrubbed_from_ordinary_words():
    scrub.register("ops")
    assert scrub.scrub("ops: failover done") == "ops: failover done"


def test_an_exception_and_its_causes_are_rewritten_keeping_type_and_retry():
    scrub.register(KEY)
    try:
        try:
            raise ValueError(f"bad header {KEY!r}")
        except ValueError as inner:
            raise ApplicationError(f"status page: {KEY}", {"key": KEY}, type="StatusPageAuth",
                                   non_retryable=True) from inner
    except ApplicationError as e:
        clean = scrubbed(e)
    assert isinstance(clean, ApplicationError) and clean.type == "StatusPageAuth" and clean.non_retryable
    assert clean.message == f"status page: {REDACTED}" and clean.details == ({"key": REDACTED},)
    cause = clean.__cause__
    assert isinstance(cause, ApplicationError) and cause.type == "ValueError" and KEY not in cause.message
    assert clean.__traceback__ is not None and cause.__traceback__ is not None  # stack traces kept
    untouched = ApplicationError("no secret here")
    assert scrubbed(untouched) is untouched


def test_an_implicit_context_is_rewritten_too():
    scrub.register(KEY)
    try:
        try:
            raise KeyError(KEY)
        except KeyError:
            raise RuntimeError("while reading the key")  # noqa: B904 - the context the SDK records as the cause
    except RuntimeError as e:
        clean = scrubbed(e)
    assert isinstance(clean, ApplicationError) and clean.type == "RuntimeError"
    assert KEY not in clean.__cause__.message and clean.__cause__.type == "KeyError"


async def test_the_interceptor_rewrites_a_failing_activity():
    scrub.register(KEY)

    class Next:
        async def execute_activity(self, input: ExecuteActivityInput):
            raise OSError(f"cannot use {KEY}")

    inbound = ScrubInterceptor().intercept_activity(Next())  # type: ignore[arg-type]
    with pytest.raises(ApplicationError) as raised:
        await inbound.execute_activity(None)  # type: ignore[arg-type]
    assert raised.value.message == f"cannot use {REDACTED}" and raised.value.type == "OSError"


# -- the real activities -----------------------------------------------------------------------------------


class Echo(BaseHTTPRequestHandler):
    """A failing upstream (a proxy's error page) that quotes the request's headers back."""

    def do_GET(self):
        body = json.dumps({"error": "bad gateway", "authorization": self.headers.get("Authorization")}).encode()
        self.send_response(502)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def statuspage_request(url: str) -> StatusPageRequest:
    page = StatusPage(api_url=url, page_id="p1", api_key=SecretRef(env="SCRUB_TEST_KEY"))
    return StatusPageRequest(page=page, status="scheduled", body="maintenance")


def test_a_status_page_key_with_a_trailing_newline_is_sent_without_it(monkeypatch, echo_server):
    monkeypatch.setenv("SCRUB_TEST_KEY", KEY + "\n")  # h11 refused it before, quoting the key in the failure
    with pytest.raises(ApplicationError) as raised:
        statuspage.update(statuspage_request(echo_server))
    assert raised.value.type == "StatusPageUnavailable"  # the upstream's 502, so the request did go out
    assert f'"authorization": "OAuth {KEY}"' in raised.value.message  # the raw message quotes it: scrubbing's job


def test_a_notification_url_without_a_scheme_names_the_channel_not_the_url(monkeypatch):
    monkeypatch.setenv("SCRUB_TEST_HOOK", HOOK.split("://")[1])
    req = NotifyRequest(notification=Notification(environment="prod", channels=[], text="hi"),
                        channels=[NotificationChannel(name="ops", url_secret=SecretRef(env="SCRUB_TEST_HOOK"))])
    with pytest.raises(ApplicationError) as raised:
        notify.send(req)
    assert raised.value.message == "channel ops: its URL is not an http(s) URL (no scheme?)"
    assert raised.value.non_retryable


@workflow.defn(sandboxed=False)
class RunOne:
    @workflow.run
    async def run(self, name: str, arg: dict) -> None:
        await workflow.execute_activity(name, arg, start_to_close_timeout=timedelta(seconds=30),
                                        retry_policy=RetryPolicy(maximum_attempts=1))


@pytest_asyncio.fixture(scope="module")
async def env():
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=DATA_CONVERTER, test_server_existing_path=venv_binary("temporal-test-server"), port=free_port()
    ) as e:
        yield e


async def failure_of(env, activity_fn, arg) -> tuple[ActivityError, bytes]:
    """Run one activity through a worker with the interceptor; its failure as the workflow saw it, and the raw
    history the cluster keeps."""
    queue = f"scrub-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(max_workers=2) as executor:
        async with Worker(env.client, task_queue=queue, workflows=[RunOne], activities=[activity_fn],
                          activity_executor=executor, interceptors=[ScrubInterceptor()],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            name = activity_fn.__temporal_activity_definition.name
            handle = await env.client.start_workflow(RunOne.run, args=[name, arg.model_dump(mode="json")],
                                                     id=queue, task_queue=queue)
            with pytest.raises(WorkflowFailureError) as failed:
                await asyncio.wait_for(handle.result(), 60)
            history = await handle.fetch_history()
    assert isinstance(failed.value.cause, ActivityError)
    return failed.value.cause, history.to_json().encode()


async def test_a_real_status_page_failure_reaches_the_history_scrubbed(env, monkeypatch, echo_server):
    monkeypatch.setenv("SCRUB_TEST_KEY", KEY + "\n")
    error, history = await failure_of(env, statuspage.update, statuspage_request(echo_server))
    cause = error.cause
    assert isinstance(cause, ApplicationError) and cause.type == "StatusPageUnavailable"
    assert "502" in cause.message and f"OAuth {REDACTED}" in cause.message  # the upstream's page, key scrubbed
    assert KEY.encode() not in history


async def test_a_real_notify_failure_against_a_closed_port_holds_no_url(env, monkeypatch):
    closed = free_port()  # reserved by us, nothing listens on it
    monkeypatch.setenv("SCRUB_TEST_HOOK", f"http://127.0.0.1:{closed}/services/T01/B02/Xy7SecretPart")
    req = NotifyRequest(notification=Notification(environment="prod", channels=[], text="hi"),
                        channels=[NotificationChannel(name="ops", url_secret=SecretRef(env="SCRUB_TEST_HOOK"))])
    error, history = await failure_of(env, notify.send, req)
    assert isinstance(error.cause, ApplicationError) and error.cause.type == "NotifyFailed"
    assert error.cause.message.startswith("channel ops: ") and b"Xy7SecretPart" not in history
