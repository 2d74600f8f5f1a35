"""Temporal plumbing safe to import anywhere (workflows included): the data converter and the search-attribute keys.
Connecting is opsflow/client.py's job."""

from __future__ import annotations

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
