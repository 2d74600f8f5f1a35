"""Payload encryption: AES-256-GCM with a key id per payload (rotation), the key configuration, and the codec
server's endpoints (what the Temporal UI calls), with CORS for the UI's origin only."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import DataConverter

from opsflow.codec import CodecConfigError, CodecKey, EncryptionCodec, configured_keys, new_key_line, parse_keys
from opsflow.codec_server import build_app

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


async def test_unencrypted_payloads_pass_through_decode():
    assert await EncryptionCodec([K1]).decode([payload("plain")]) == [payload("plain")]


async def test_with_the_pydantic_converter():
    import dataclasses

    from opsflow.temporal import DATA_CONVERTER

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
        assert pre.headers["Access-Control-Allow-Origin"] == ui and "x-namespace" in pre.headers["Access-Control-Allow-Headers"]
        other = await client.options("/decode", headers={"Origin": "http://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        bad = await client.post("/decode", data="not json")
        assert bad.status == 400


async def test_codec_server_token():
    async with TestClient(TestServer(build_app(EncryptionCodec([K1]), [], auth_token="t0k"))) as client:
        body = json_format.MessageToJson(Payloads(payloads=[payload("x")]))
        assert (await client.post("/encode", data=body)).status == 401
        assert (await client.post("/encode", data=body, headers={"Authorization": "Bearer t0k"})).status == 200
