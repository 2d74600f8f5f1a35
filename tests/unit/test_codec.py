"""Payload encryption: AES-256-GCM with a key id per payload (rotation), the key configuration, and the codec
server's endpoints (what the Temporal UI calls), with CORS for the UI's origin only."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload, Payloads, SearchAttributes
from temporalio.api.failure.v1 import Failure
from temporalio.client import WorkflowFailureError
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.converter import DataConverter, DefaultFailureConverter
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from lab.ports import free_port
from opsflow.codec import (
    CodecConfigError,
    CodecKey,
    EncryptionCodec,
    UnencryptedPayloadError,
    configured_keys,
    new_key_line,
    parse_keys,
)
from opsflow.codec_server import build_app
from opsflow.temporal import DATA_CONVERTER, OPS_PROCEDURE, register_search_attributes
from tests.conftest import venv_binary

K1 = CodecKey("k1", b"\x01" * 32)
K2 = CodecKey("k2", b"\x02" * 32)
SECRET = "host=db-eastus.internal user=ops"


def payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


async def test_roundtrip_hides_the_plaintext_and_names_the_key():
    codec = EncryptionCodec([K1])
    [enc] = await codec.encode([payload(SECRET)])
    assert b"db-eastus" not in enc.SerializeToString()
    assert enc.metadata["encryption-key-id"] == b"k1" and enc.metadata["encoding"] == b"binary/encrypted"
    [dec] = await codec.decode([enc])
    assert dec == payload(SECRET)


async def test_rotation_new_key_encrypts_old_key_still_decrypts():
    [old] = await EncryptionCodec([K1]).encode([payload("old")])
    rotated = EncryptionCodec([K2, K1])
    [new] = await rotated.encode([payload("new")])
    assert new.metadata["encryption-key-id"] == b"k2"
    assert [p.data for p in await rotated.decode([old, new])] == [b'"old"', b'"new"']
    with pytest.raises(ValueError, match="key id 'k2'"):
        await EncryptionCodec([K1]).decode([new])


async def test_tampering_and_key_id_swap_are_detected():
    from cryptography.exceptions import InvalidTag

    codec = EncryptionCodec([K1, CodecKey("k1b", K1.key)])
    [enc] = await codec.encode([payload("x")])
    flipped = Payload(metadata=enc.metadata, data=enc.data[:-1] + bytes([enc.data[-1] ^ 1]))
    with pytest.raises(InvalidTag):
        await codec.decode([flipped])
    relabelled = Payload(metadata={**enc.metadata, "encryption-key-id": b"k1b"}, data=enc.data)  # same key, other id
    with pytest.raises(InvalidTag):
        await codec.decode([relabelled])


async def test_a_process_with_keys_refuses_an_unencrypted_payload():
    with pytest.raises(UnencryptedPayloadError, match=r"unencrypted payload \(encoding 'json/plain'\)"):
        await EncryptionCodec([K1]).decode([payload("plain")])
    conv = dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec([K1]))
    [clear] = await DATA_CONVERTER.encode([{"signal": "from a client without the key"}])
    with pytest.raises(UnencryptedPayloadError, match="payload encryption is on"):
        await conv.decode([clear], [dict])
    # The codec server only shows payloads: those of histories recorded before encryption, as they are.
    assert await EncryptionCodec([K1], accept_plaintext=True).decode([payload("plain")]) == [payload("plain")]


def failure_chain() -> ApplicationError:
    try:
        try:
            raise ConnectionError(f"no route to {SECRET}")
        except ConnectionError as e:
            raise ApplicationError(f"promote failed on {SECRET}", type="PromoteFailed") from e
    except ApplicationError as e:
        return e


async def test_failure_messages_and_stack_traces_are_encrypted_with_keys():
    conv = dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec([K1]))
    failure = Failure()
    await conv.encode_failure(failure_chain(), failure)
    stored = failure.SerializeToString()
    assert b"db-eastus" not in stored and b"failure_chain" not in stored  # neither message nor stack trace
    assert failure.message == "Encoded failure" and failure.cause.message == "Encoded failure"
    assert failure.encoded_attributes.metadata["encoding"] == b"binary/encrypted"
    assert failure.application_failure_info.type == "PromoteFailed"  # types stay readable: retry policies match them
    back = await conv.decode_failure(failure)
    assert isinstance(back, ApplicationError) and back.message == f"promote failed on {SECRET}"
    assert "failure_chain" in (back.failure.stack_trace if back.failure else "")
    assert isinstance(back.__cause__, ApplicationError) and back.__cause__.message == f"no route to {SECRET}"


async def test_without_keys_failures_stay_plain_and_either_kind_decodes():
    plain = Failure()
    await DATA_CONVERTER.encode_failure(failure_chain(), plain)
    assert plain.message == f"promote failed on {SECRET}"
    conv = dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec([K1]))
    assert (await conv.decode_failure(plain)).message == plain.message  # a failure has no payload to refuse here
    # Turning encryption off again (replace without a codec) puts messages back in clear.
    assert dataclasses.replace(conv, payload_codec=None).failure_converter_class is DefaultFailureConverter


def test_search_attributes_never_pass_through_the_codec():
    from temporalio.converter import decode_typed_search_attributes, encode_search_attributes

    proto = SearchAttributes()
    encode_search_attributes(TypedSearchAttributes([SearchAttributePair(OPS_PROCEDURE, "failover")]), proto)
    assert proto.indexed_fields["OpsProcedure"].data == b'"failover"'  # clear: the cluster indexes them
    # Decoding is synchronous and takes no converter: the codec (and its refusal) cannot be in the way.
    assert decode_typed_search_attributes(proto).get(OPS_PROCEDURE) == "failover"


async def test_with_the_pydantic_converter():
    conv: DataConverter = dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec([K1]))
    [p] = await conv.encode([{"dsn": SECRET}])
    assert b"db-eastus" not in p.data
    assert await conv.decode([p], [dict]) == [{"dsn": SECRET}]


def test_key_parsing_errors_name_the_problem():
    good = new_key_line("k2026")
    assert [k.id for k in parse_keys(f"{good}\n# old:\n{new_key_line('k2025')}")] == ["k2026", "k2025"]
    for text, error in [
        ("", "no key"),
        ("nokeyid", "KEY_ID:BASE64"),
        ("k1:!!!", "not base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "5 bytes; AES-256 needs 32"),
        (f"{good},{good}", "listed twice"),
    ]:
        with pytest.raises(CodecConfigError, match=error):
            parse_keys(text)


def test_key_configuration_from_a_secret_reference(tmp_path, monkeypatch):
    line = new_key_line("lab1")
    monkeypatch.setenv("MY_CODEC_KEYS", line)
    assert [k.id for k in configured_keys({"OPSFLOW_CODEC_KEY": "{env: MY_CODEC_KEYS}"})] == ["lab1"]
    f = tmp_path / "keys"
    f.write_text(line + "\n")
    assert [k.id for k in configured_keys({"OPSFLOW_CODEC_KEY_FILE": str(f)})] == ["lab1"]
    assert configured_keys({}) is None
    with pytest.raises(CodecConfigError, match="secret reference"):
        configured_keys({"OPSFLOW_CODEC_KEY": "lab1:AAAA"})
    with pytest.raises(CodecConfigError, match="NOPE is not set"):
        configured_keys({"OPSFLOW_CODEC_KEY": "{env: NOPE}"})
    with pytest.raises(CodecConfigError, match="not both"):
        configured_keys({"OPSFLOW_CODEC_KEY": "{env: X}", "OPSFLOW_CODEC_KEY_FILE": str(f)})


async def test_codec_server_endpoints_and_cors():
    codec = EncryptionCodec([K1])
    ui = "http://127.0.0.1:8233"
    async with TestClient(TestServer(build_app(codec, [ui]))) as client:
        body = json_format.MessageToJson(Payloads(payloads=[payload(SECRET)]))
        r = await client.post("/encode", data=body, headers={"Origin": ui, "X-Namespace": "default"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ui
        encoded = await r.text()
        assert "db-eastus" not in encoded
        r = await client.post("/default/decode", data=encoded, headers={"Origin": ui})
        decoded = json_format.Parse(await r.text(), Payloads())
        assert list(decoded.payloads) == [payload(SECRET)]
        pre = await client.options("/decode", headers={"Origin": ui, "Access-Control-Request-Method": "POST"})
        assert (
            pre.headers["Access-Control-Allow-Origin"] == ui
            and "x-namespace" in pre.headers["Access-Control-Allow-Headers"]
        )
        other = await client.options("/decode", headers={"Origin": "http://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        bad = await client.post("/decode", data="not json")
        assert bad.status == 400


async def test_codec_server_token():
    async with TestClient(TestServer(build_app(EncryptionCodec([K1]), [], auth_token="t0k"))) as client:
        body = json_format.MessageToJson(Payloads(payloads=[payload("x")]))
        assert (await client.post("/encode", data=body)).status == 401
        assert (await client.post("/encode", data=body, headers={"Authorization": "Bearer t0k"})).status == 200


@activity.defn(name="codec_test.fail")
def fail_naming_the_host() -> None:
    raise ApplicationError(f"cannot reach {SECRET}", type="Unreachable", non_retryable=True)


@workflow.defn(sandboxed=False)
class FailsLoudly:
    @workflow.run
    async def run(self) -> None:
        procedure = workflow.info().typed_search_attributes.get(OPS_PROCEDURE)  # read unencrypted by the SDK
        try:
            await workflow.execute_activity(fail_naming_the_host, start_to_close_timeout=timedelta(seconds=30))
        except ActivityError as e:
            reason = getattr(e.cause, "message", e.cause)
            raise ApplicationError(f"{procedure} stopped: {reason}", type="ProcedureFailed") from e


async def test_an_encrypted_worker_keeps_failure_text_out_of_the_history():
    conv = dataclasses.replace(DATA_CONVERTER, payload_codec=EncryptionCodec([K1]))
    async with await WorkflowEnvironment.start_time_skipping(
        data_converter=conv, test_server_existing_path=venv_binary("temporal-test-server"), port=free_port()
    ) as env:
        await register_search_attributes(env.client)
        with ThreadPoolExecutor(max_workers=2) as executor:
            async with Worker(env.client, task_queue="codec-test", workflows=[FailsLoudly],
                              activities=[fail_naming_the_host], activity_executor=executor,
                              workflow_runner=UnsandboxedWorkflowRunner()):
                handle = await env.client.start_workflow(
                    FailsLoudly.run, id=f"codec-{uuid.uuid4().hex[:8]}", task_queue="codec-test",
                    search_attributes=TypedSearchAttributes([SearchAttributePair(OPS_PROCEDURE, "failover")]))
                with pytest.raises(WorkflowFailureError) as failed:
                    await handle.result()
                raw = (await handle.fetch_history()).to_json()
    cause = failed.value.cause  # decoded with the key: the workflow's own failure, then the activity's
    assert isinstance(cause, ApplicationError) and cause.message == f"failover stopped: cannot reach {SECRET}"
    assert isinstance(cause.__cause__, ActivityError) and cause.__cause__.cause.message == f"cannot reach {SECRET}"
    assert "db-eastus" not in raw and "Encoded failure" in raw  # the cluster saw neither message
    assert "Unreachable" in raw  # failure types stay clear, for retry policies
