"""Fetch a secret on the worker from where the inventory says it lives. Never logged, never returned to a workflow.

Sources: an environment variable, a file, AWS Secrets Manager (boto3), Azure Key Vault (azure-keyvault-secrets).
Values from the cloud stores are cached for a short while (one procedure asks for the same password many
times); a rotated secret is picked up within CACHE_SECONDS.

The worker calls `configure(inventory)` once so the cloud stores use the inventory's connections (AWS
endpoint/region, Azure credential and CA bundle) — the same ones the other activities use.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from temporalio.exceptions import ApplicationError

from opsflow import scrub
from opsflow.inventory import AwsConnection, AzureConnection, Inventory, SecretRef

CACHE_SECONDS = 60.0

_lock = threading.Lock()
_cache: dict[tuple, tuple[float, str]] = {}
_aws: AwsConnection | None = None
_azure: AzureConnection | None = None


def configure(inventory: Inventory | None) -> None:
    """Use this inventory's cloud connections for secret stores (the worker calls it at start)."""
    global _aws, _azure
    _aws = inventory.aws if inventory else None
    _azure = inventory.azure if inventory else None
    with _lock:
        _cache.clear()


def _missing(message: str) -> ApplicationError:
    return ApplicationError(f"secret: {message}", type="SecretMissing", non_retryable=True)


def resolve(ref: SecretRef) -> str:
    """The secret's value; from here on the worker scrubs it from every activity failure (opsflow.scrub)."""
    value = _resolve(ref)
    scrub.register(value)
    return value


def _resolve(ref: SecretRef) -> str:
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise _missing(f"environment variable {ref.env} is not set on this worker")
        return value
    if ref.file is not None:
        path = Path(ref.file)
        try:
            return path.read_text().strip()
        except OSError as e:
            raise _missing(f"cannot read {path}: {e.strerror}") from None
    key = (ref.model_dump_json(),)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit and now - hit[0] < CACHE_SECONDS:
            return hit[1]
    value = _aws_secret(ref) if ref.aws_secrets_manager is not None else _key_vault_secret(ref)
    with _lock:
        _cache[key] = (now, value)
    return value


def _aws_secret(ref: SecretRef) -> str:
    # boto3 loads on first use (~0.5 s): the CLI's codec and every worker import this module.
    from botocore.exceptions import BotoCoreError, ClientError

    from activities.aws.session import new_session  # a Session of its own: boto3's default one is not thread-safe

    spec = ref.aws_secrets_manager
    assert spec is not None
    conn = _aws or AwsConnection()
    client = new_session().client(
        "secretsmanager", region_name=spec.region or conn.default_region, endpoint_url=conn.endpoint_url
    )
    try:
        answer = client.get_secret_value(SecretId=spec.secret_id)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in (
            "ResourceNotFoundException",
            "AccessDeniedException",
            "DecryptionFailure",
            "InvalidRequestException",
        ):
            raise _missing(f"{ref.describe()}: {code}") from None
        # throttling etc.: retry
        raise ApplicationError(f"secret: {ref.describe()}: {code}", type="SecretUnavailable") from None
    except BotoCoreError as e:
        raise ApplicationError(f"secret: {ref.describe()}: {type(e).__name__}", type="SecretUnavailable") from None
    value = answer.get("SecretString")
    if value is None:
        raise _missing(f"{ref.describe()} is binary; opsflow reads string secrets")
    return _json_field(value, spec.key, ref)


def _json_field(value: str, field: str | None, ref: SecretRef) -> str:
    if field is None:
        return value
    try:
        data: Any = json.loads(value)
    except ValueError:
        raise _missing(f"{ref.describe()} is not JSON, so it has no field {field!r}") from None
    if not isinstance(data, dict) or field not in data:
        raise _missing(f"{ref.describe()} has no field {field!r}")
    return str(data[field])


def _key_vault_secret(ref: SecretRef) -> str:
    # The Azure SDK loads on first use, as boto3 above.
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
    )
    from azure.keyvault.secrets import SecretClient

    from activities.azure.arm import arm_credential

    spec = ref.azure_key_vault
    assert spec is not None
    conn = _azure or AzureConnection()
    kwargs: dict[str, Any] = {"retry_total": 3, "connection_timeout": 10, "read_timeout": 30}
    if conn.ca_bundle:
        kwargs["connection_verify"] = conn.ca_bundle
    if conn.credential == "static-token":
        # The lab's emulator serves the vault on its own address (no *.vault.azure.net domain to match).
        kwargs["verify_challenge_resource"] = False
    client = SecretClient(vault_url=spec.vault_url, credential=arm_credential(conn), **kwargs)
    try:
        secret = client.get_secret(spec.name, spec.version)
    except ResourceNotFoundError:
        raise _missing(f"{ref.describe()} does not exist") from None
    except ClientAuthenticationError as e:
        raise _missing(
            f"{ref.describe()}: not allowed ({e.message.splitlines()[0] if e.message else 'authentication failed'})"
        ) from None
    except HttpResponseError as e:
        if e.status_code in (401, 403):
            raise _missing(f"{ref.describe()}: not allowed (HTTP {e.status_code})") from None
        raise ApplicationError(f"secret: {ref.describe()}: HTTP {e.status_code}", type="SecretUnavailable") from None
    except ServiceRequestError as e:
        raise ApplicationError(f"secret: {ref.describe()}: {type(e).__name__}", type="SecretUnavailable") from None
    finally:
        client.close()
    if secret.value is None:
        raise _missing(f"{ref.describe()} has no value")
    return secret.value
