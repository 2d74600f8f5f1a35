"""Temporal plumbing shared by the CLI, the worker and the tests: connection, data converter, search attributes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

# Registered by `opsflow lab up` (and documented for team clusters) so the UI and `opsflow list` can filter.
OPS_PROCEDURE = SearchAttributeKey.for_keyword("OpsProcedure")
OPS_ENVIRONMENT = SearchAttributeKey.for_keyword("OpsEnvironment")
OPS_STEP = SearchAttributeKey.for_keyword("OpsStep")
OPS_STATUS = SearchAttributeKey.for_keyword("OpsStatus")
SEARCH_ATTRIBUTES = [OPS_PROCEDURE, OPS_ENVIRONMENT, OPS_STEP, OPS_STATUS]

DATA_CONVERTER = pydantic_data_converter


def data_converter(target_host: str | None = None):
    """The pydantic converter, encrypting payloads (opsflow/codec.py) when a codec key is configured
    (OPSFLOW_CODEC_KEY / OPSFLOW_CODEC_KEY_FILE), or when talking to a lab started with --encrypt (its key
    file). The CLI and the worker both use this."""
    import dataclasses

    from opsflow.codec import KEY_FILE_ENV, codec_from_env

    codec = codec_from_env()
    if codec is None:
        lab = lab_state()
        if lab and lab.get("codec") and target_host == lab["temporal"]["address"]:
            codec = codec_from_env({KEY_FILE_ENV: lab["codec"]["key_file"]})
    return dataclasses.replace(DATA_CONVERTER, payload_codec=codec) if codec else DATA_CONVERTER


def lab_pointer() -> Path:
    """Where `opsflow lab up` notes the directory of the running lab ($OPSFLOW_HOME, default ~/.opsflow)."""
    return Path(os.environ.get("OPSFLOW_HOME") or Path.home() / ".opsflow") / "current-lab"


def lab_state() -> dict | None:
    """The state file of the lab started last by `opsflow lab up`, if it is still there."""
    try:
        lab_dir = Path(lab_pointer().read_text().strip())
        return json.loads((lab_dir / "lab.json").read_text())
    except (OSError, ValueError):
        return None


def connect_config() -> dict:
    """Where to connect, from the standard places: a Temporal envconfig profile (TEMPORAL_CONFIG_FILE,
    TEMPORAL_PROFILE) and the TEMPORAL_ADDRESS / TEMPORAL_NAMESPACE / TEMPORAL_API_KEY / TLS variables.
    With none of those, the running lab's server, else localhost:7233."""
    from temporalio.envconfig import ClientConfig

    config = dict(ClientConfig.load_client_connect_config())
    if "target_host" not in config:
        lab = lab_state()
        config["target_host"] = lab["temporal"]["address"] if lab else "localhost:7233"
    return config


async def connect() -> Client:
    config = connect_config()
    target = config.pop("target_host")
    return await Client.connect(target, data_converter=data_converter(target), **config)


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Register opsflow's search attributes (idempotent). Team clusters: run once, or `temporal operator
    search-attribute create --name OpsProcedure --type Keyword` for each."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
    from temporalio.service import RPCError, RPCStatusCode

    wanted = {k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in SEARCH_ATTRIBUTES}
    try:
        await client.operator_service.add_search_attributes(AddSearchAttributesRequest(namespace=namespace, search_attributes=wanted))
    except RPCError as e:
        if e.status != RPCStatusCode.ALREADY_EXISTS:
            raise
