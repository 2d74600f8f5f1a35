"""Temporal plumbing safe to import anywhere (workflows included): the data converter and the search-attribute keys.
Connecting is opsflow/client.py's job."""

from __future__ import annotations

import dataclasses

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, DefaultFailureConverter, DefaultFailureConverterWithEncodedAttributes

# Registered by `opsflow lab up` (and documented for team clusters) so the UI and `opsflow list` can filter.
OPS_PROCEDURE = SearchAttributeKey.for_keyword("OpsProcedure")
OPS_ENVIRONMENT = SearchAttributeKey.for_keyword("OpsEnvironment")
OPS_STEP = SearchAttributeKey.for_keyword("OpsStep")
OPS_STATUS = SearchAttributeKey.for_keyword("OpsStatus")
SEARCH_ATTRIBUTES = [OPS_PROCEDURE, OPS_ENVIRONMENT, OPS_STEP, OPS_STATUS]



@dataclasses.dataclass(frozen=True)
class OpsDataConverter(DataConverter):
    """Pydantic payloads; with a payload codec (encryption) failure messages and stack traces are encrypted too.

    The SDK's failure converter writes both in clear text by default, and a failure's message quotes what the
    payloads hide (a host, a resource name). The choice follows the codec, so `dataclasses.replace(DATA_CONVERTER,
    payload_codec=codec)` (what opsflow.client does) gets it. A failure written either way decodes either way.
    """

    payload_converter_class: type = PydanticPayloadConverter

    def __post_init__(self) -> None:
        # The class, not only the instance: workflows build their own failure converter from it in the sandbox.
        if self.failure_converter_class in (DefaultFailureConverter, DefaultFailureConverterWithEncodedAttributes):
            wanted = DefaultFailureConverterWithEncodedAttributes if self.payload_codec else DefaultFailureConverter
            object.__setattr__(self, "failure_converter_class", wanted)
        super().__post_init__()


DATA_CONVERTER = OpsDataConverter()


async def register_search_attributes(client: Client, namespace: str = "default") -> None:
    """Register opsflow's search attributes (idempotent). Team clusters: run once, or `temporal operator
    search-attribute create --name OpsProcedure --type Keyword` for each."""
    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
    from temporalio.service import RPCError, RPCStatusCode

    wanted = {k.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for k in SEARCH_ATTRIBUTES}
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=wanted)
        )
    except RPCError as e:
        if e.status != RPCStatusCode.ALREADY_EXISTS:
            raise
