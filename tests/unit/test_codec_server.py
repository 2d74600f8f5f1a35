"""The real codec server (`python -m opsflow.codec_server`) on a free loopback port: it answers only to its own
names (DNS rebinding), and refuses to listen beyond loopback without authentication."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from lab.ports import free_port
from opsflow.codec import new_key_line
from opsflow.codec_server import host_name, is_loopback, main

BODY = json_format.MessageToJson(Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')]))


@pytest.fixture
def key_env(tmp_path, monkeypatch):
    keys = tmp_path / "codec.keys"
    keys.write_text(new_key_line("t1") + "\n")
    monkeypatch.setenv("OPSFLOW_CODEC_KEY_FILE", str(keys))
    monkeypatch.delenv("OPSFLOW_CODEC_KEY", raising=False)
    monkeypatch.setenv("OPSFLOW_HOME", str(tmp_path / "home"))  # no running lab's UI origin in the way
    return {**os.environ}


def start(env: dict, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "opsflow.codec_server", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once it listens
    assert line.startswith("codec server on "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, port


@pytest.fixture
def server(key_env):
    proc, port = start(key_env, "--allowed-host", "codec.internal.example")
    yield port
    proc.terminate()
    proc.wait(10)


def test_its_own_names_are_answered(server):
    for host in (f"127.0.0.1:{server}", f"localhost:{server}", "LOCALHOST", f"codec.internal.example:{server}"):
        r = httpx.post(f"http://127.0.0.1:{server}/encode", content=BODY, headers={"Host": host})
        assert r.status_code == 200 and "YmluYXJ5L2VuY3J5cHRlZA" in r.text, (host, r.text)  # binary/encrypted


def test_a_rebound_name_gets_421(server):
    for host in (f"attacker.example:{server}", "127.0.0.1.attacker.example", f"codec.internal.example.evil:{server}"):
        for method, path in (("POST", "/decode"), ("POST", "/default/encode"), ("OPTIONS", "/decode")):
            r = httpx.request(method, f"http://127.0.0.1:{server}{path}", content=BODY,
                              headers={"Host": host, "Origin": f"http://{host}"})
            assert r.status_code == 421 and "unknown Host" in r.text, (host, method, path)
            assert "Access-Control-Allow-Origin" not in r.headers


def test_it_refuses_to_listen_beyond_loopback_without_auth(key_env, capsys):
    for host in ("0.0.0.0", "", "10.1.2.3", "codec.example"):
        assert main(["--host", host, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert "is not a loopback address" in err and "--require-auth" in err, err
    # With auth but no token: still refused, naming the variable.
    key_env.pop("OPSFLOW_CODEC_SERVER_TOKEN", None)
    assert main(["--host", "0.0.0.0", "--port", str(free_port()), "--require-auth"]) == 2
    assert "OPSFLOW_CODEC_SERVER_TOKEN" in capsys.readouterr().err


def test_with_auth_it_listens_beyond_loopback_and_checks_the_token(key_env):
    # Listening on every interface; reached over loopback here, with the token, by a name it was given.
    proc, port = start({**key_env, "OPSFLOW_CODEC_SERVER_TOKEN": "s3cr3t-t0ken"}, "--host", "0.0.0.0",
                       "--require-auth", "--allowed-host", "codec.internal.example")
    try:
        url = f"http://127.0.0.1:{port}/encode"
        good = {"Host": "codec.internal.example", "Authorization": "Bearer s3cr3t-t0ken"}
        assert httpx.post(url, content=BODY, headers=good).status_code == 200
        assert httpx.post(url, content=BODY, headers={**good, "Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(url, content=BODY, headers={**good, "Host": "0.0.0.0"}).status_code == 421
    finally:
        proc.terminate()
        proc.wait(10)


def test_host_parsing():
    assert [host_name(h) for h in ("a.example:8081", "[::1]:8081", "::1", "Localhost", "")] == \
        ["a.example", "::1", "::1", "localhost", ""]
    assert [is_loopback(h) for h in ("127.0.0.1", "127.5.5.5", "::1", "[::1]", "localhost", "0.0.0.0", "", "h")] == \
        [True, True, True, True, True, False, False, False]
