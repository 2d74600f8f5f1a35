"""Secret references resolved against real clients: AWS Secrets Manager on moto's server, Azure Key Vault through
the azure-keyvault-secrets SDK against the lab's HTTPS ARM emulator (bearer challenge, test CA)."""

from __future__ import annotations

import json
import os

import pytest
from temporalio.exceptions import ApplicationError

from activities import secrets
from opsflow.inventory import AwsConnection, AzureConnection, SecretRef


@pytest.fixture
def moto_url(fake_aws_credentials):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def vault(tmp_path):
    from lab.arm_emulator import start_emulator

    emu = start_emulator({"key_vault_secrets": {"db-password": "kv-s3cret"}}, tmp_path / "ca")
    yield emu
    emu.stop()


class _Inv:
    def __init__(self, aws=None, azure=None):
        self.aws, self.azure = aws, azure


def test_aws_secrets_manager(moto_url):
    import boto3

    sm = boto3.client("secretsmanager", region_name="eu-west-1", endpoint_url=moto_url)
    sm.create_secret(Name="opsflow/db", SecretString=json.dumps({"password": "aws-s3cret"}))
    sm.create_secret(Name="opsflow/hook", SecretString="https://hooks.example/x")
    secrets.configure(_Inv(aws=AwsConnection(endpoint_url=moto_url, default_region="eu-west-1")))
    try:
        assert (
            secrets.resolve(SecretRef(aws_secrets_manager={"secret_id": "opsflow/db", "key": "password"}))
            == "aws-s3cret"
        )
        assert secrets.resolve(SecretRef(aws_secrets_manager={"secret_id": "opsflow/hook"})) == "https://hooks.example/x"
        with pytest.raises(ApplicationError, match="opsflow/nope: ResourceNotFoundException") as e:
            secrets.resolve(SecretRef(aws_secrets_manager={"secret_id": "opsflow/nope"}))
        assert e.value.non_retryable
        with pytest.raises(ApplicationError, match="no field 'user'"):
            secrets.resolve(SecretRef(aws_secrets_manager={"secret_id": "opsflow/db", "key": "user"}))
    finally:
        secrets.configure(None)


def test_azure_key_vault_through_the_sdk(vault):
    secrets.configure(
        _Inv(azure=AzureConnection(arm_endpoint=vault.url, credential="static-token", ca_bundle=str(vault.ca_path)))
    )
    try:
        ref = SecretRef(azure_key_vault={"vault_url": vault.url, "name": "db-password"})
        assert secrets.resolve(ref) == "kv-s3cret"
        # The SDK went through the challenge: one unauthenticated request answered 401, then the token.
        gets = [r for r in vault.requests() if r.get("path", "").startswith("/secrets/")]
        assert [r["status"] for r in gets][:2] == [401, 200], gets
        with pytest.raises(ApplicationError, match="does not exist") as e:
            secrets.resolve(SecretRef(azure_key_vault={"vault_url": vault.url, "name": "missing"}))
        assert e.value.non_retryable
    finally:
        secrets.configure(None)


def test_cloud_secrets_are_cached_briefly(moto_url):
    import boto3

    sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url)
    sm.create_secret(Name="rotating", SecretString="v1")
    secrets.configure(_Inv(aws=AwsConnection(endpoint_url=moto_url)))
    try:
        ref = SecretRef(aws_secrets_manager={"secret_id": "rotating"})
        assert secrets.resolve(ref) == "v1"
        sm.put_secret_value(SecretId="rotating", SecretString="v2")
        assert secrets.resolve(ref) == "v1"  # cached
        secrets.CACHE_SECONDS, saved = 0.0, secrets.CACHE_SECONDS
        try:
            assert secrets.resolve(ref) == "v2"
        finally:
            secrets.CACHE_SECONDS = saved
    finally:
        secrets.configure(None)


def test_env_secret_is_not_cached(monkeypatch):
    monkeypatch.setenv("OPSFLOW_T_SECRET", "a")
    assert secrets.resolve(SecretRef(env="OPSFLOW_T_SECRET")) == "a"
    monkeypatch.setenv("OPSFLOW_T_SECRET", "b")
    assert secrets.resolve(SecretRef(env="OPSFLOW_T_SECRET")) == "b"
    assert os.environ["OPSFLOW_T_SECRET"] == "b"
