"""The lab's database flavour is recorded once (state["database"], `opsflow lab up --database`) and derived from
there; a lab.json written before that key still reads as the flavour it ran."""

from __future__ import annotations

import pytest

from lab.inventory import lab_database


@pytest.mark.parametrize(
    "state, flavour",
    [
        ({"database": "self-managed", "cloud": "azure"}, "self-managed"),
        ({"database": "patroni", "patroni": {"regions": {}}}, "patroni"),
        ({"database": "cloud"}, "cloud"),
        ({}, "cloud"),  # an old state file: no key, no crash
        ({"self_managed": True}, "self-managed"),  # written before the key
        ({"patroni": {"regions": {}}}, "patroni"),
        ({"database": None, "self_managed": False}, "cloud"),
    ],
)
def test_the_flavour_is_derived_from_what_lab_up_recorded(state, flavour):
    assert lab_database(state) == flavour
