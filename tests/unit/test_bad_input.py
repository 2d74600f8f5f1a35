"""Bad input, tried systematically (hypothesis): every malformed inventory or command line ends in a clear
error that names the field or argument, with exit code 2 and no traceback, before anything is started.

The CLI runs in-process (`main(argv)` returns the exit code) with Temporal unreachable: had it got as far as
connecting, it would exit 1 ("cannot reach Temporal"), so exit 2 also proves nothing was started."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opsflow.inventory import InventoryError, load_inventory
from starters.cli import main as cli
from tests.workflow.conftest import inventory_dict

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
BASE = inventory_dict(environment="prod")
BASE["approval"]["approvers"] = ["alice", "bob"]


@pytest.fixture(autouse=True)
def no_temporal(monkeypatch, tmp_path):
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("OPSFLOW_HOME", str(tmp_path / "home"))  # no lab to fall back on
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


ALL_PATHS = paths(BASE)


def get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def run_cli(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli(argv)
        except SystemExit as e:  # argparse's own errors exit 2 with a usage line
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def names_a_component(message: str, path: tuple) -> bool:
    # A cross-reference may name the other end in the singular ("... is not a notification channel").
    return any(isinstance(p, str) and (p in message or (len(p) > 4 and p.rstrip("s") in message)) for p in path)


def check_refused(tmp_path, data: Any, path: tuple) -> None:
    """The inventory is refused by load_inventory and by the CLI, naming a component of `path`."""
    f = tmp_path / "inventory.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError) as exc:
        load_inventory(f)
    assert names_a_component(str(exc.value), path), f"{path}: {exc.value}"
    code, err = run_cli(["failover", "--env", str(f), "--to", "westeurope"])
    assert code == 2, err
    assert err.startswith("error:") and "Traceback" not in err and names_a_component(err, path), err


WRONG_VALUES = st.sampled_from([None, -7, 3.5, True, "", "🙂 garbage", [], [1, "x"], {"nested": {"deep": 1}}])


@SETTINGS
@given(path=st.sampled_from(ALL_PATHS), value=WRONG_VALUES)
def test_a_wrong_value_anywhere_is_named_or_harmless(tmp_path, path, value):
    data = copy.deepcopy(BASE)
    parent = get(data, path[:-1])
    parent[path[-1]] = value
    f = tmp_path / "inventory.yaml"
    f.write_text(yaml.safe_dump(data))
    try:
        load_inventory(f)
    except InventoryError as e:
        assert names_a_component(str(e), path), f"{path} = {value!r}: {e}"
        code, err = run_cli(["failover", "--env", str(f), "--to", "westeurope"])
        assert code == 2 and "Traceback" not in err and names_a_component(err, path), err


@SETTINGS
@given(path=st.sampled_from([p for p in ALL_PATHS if isinstance(p[-1], str)]))
def test_a_missing_field_is_named_or_optional(tmp_path, path):
    data = copy.deepcopy(BASE)
    del get(data, path[:-1])[path[-1]]
    f = tmp_path / "inventory.yaml"
    f.write_text(yaml.safe_dump(data))
    try:
        load_inventory(f)
    except InventoryError as e:
        assert names_a_component(str(e), path), f"without {path}: {e}"


@SETTINGS
@given(path=st.sampled_from([()] + [p for p in ALL_PATHS if isinstance(get(BASE, p), dict)]),
       key=st.from_regex(r"\A[a-z][a-z_]{2,12}\Z"))
def test_an_unknown_key_is_named(tmp_path, path, key):
    data = copy.deepcopy(BASE)
    node = get(data, path)
    assume(key not in node and not (path == ("regions",)))  # a new key under regions is a new region, tested below
    node[key] = "x"
    check_refused(tmp_path, data, (*path, key))


PLAINTEXT_SECRETS = st.sampled_from([
    "postgresql://ops:hunter2@db.internal/app",
    "https://hooks.slack.com/services/T000/B000/XXXXXXXX",
    "https://events.pagerduty.com/v2/enqueue?routing_key=abc",
    "https://api.example/health?token=abc123",
    "xoxb-1234567890-abcdefghij",
])


@SETTINGS
@given(path=st.sampled_from([p for p in ALL_PATHS if isinstance(get(BASE, p), str)]), secret=PLAINTEXT_SECRETS)
def test_a_plaintext_secret_in_any_text_field_is_refused_naming_it(tmp_path, path, secret):
    data = copy.deepcopy(BASE)
    get(data, path[:-1])[path[-1]] = secret
    check_refused(tmp_path, data, path)


def test_the_plaintext_secret_rules_name_the_exact_field(tmp_path):
    for mutate, field in [
        (
            lambda d: d["notifications"][0].update(url="https://hooks.slack.com/services/T/B/X", url_secret=None),
            r"notifications\.0\.url",
        ),
        (
            lambda d: d["regions"]["eastus"]["database"].update(dsn="postgresql://u:p@db/app"),
            r"regions\.eastus\.database\.(postgres\.)?dsn",
        ),
        (
            lambda d: d["regions"]["eastus"]["database"].update(dsn="postgresql://db/app?password=p"),
            r"regions\.eastus\.database\.(postgres\.)?dsn",
        ),
        (
            lambda d: d["regions"]["eastus"]["database"].update(password="hunter2"),
            r"regions\.eastus\.database\.password",
        ),
        (
            lambda d: d["regions"]["eastus"]["smoke_urls"].append("https://x/health?api_key=k"),
            r"regions\.eastus\.smoke_urls\.1",
        ),
    ]:
        data = copy.deepcopy(BASE)
        mutate(data)
        data["notifications"][0] = {k: v for k, v in data["notifications"][0].items() if v is not None}
        f = tmp_path / "inventory.yaml"
        f.write_text(yaml.safe_dump(data))
        with pytest.raises(InventoryError, match=field):
            load_inventory(f)


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_text_as_an_inventory_is_a_clear_error(tmp_path, text):
    f = tmp_path / "inventory.yaml"
    f.write_text(text)
    with pytest.raises(
        InventoryError, match=r"inventory .*(not valid YAML|must be a mapping|is invalid|holds secrets)"
    ):
        load_inventory(f)
    code, err = run_cli(["drill", "--env", str(f)])
    assert code == 2 and err.startswith("error: inventory") and "Traceback" not in err


# -- command lines -----------------------------------------------------------------------------------------

ACTIONS = ["approve", "reject", "pause", "resume", "abort", "override"]
JUNK = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20
)


@pytest.fixture
def inventory_file(tmp_path):
    f = tmp_path / "good.yaml"
    f.write_text(yaml.safe_dump(BASE))
    return str(f)


@SETTINGS
@given(region=st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z"), command=st.sampled_from(["failover", "failback"]))
def test_an_unknown_region_is_named(inventory_file, region, command):
    assume(region not in BASE["regions"])
    code, err = run_cli([command, "--env", inventory_file, "--to", region])
    assert code == 2 and f"unknown region {region!r}" in err and "Traceback" not in err, err


@SETTINGS
@given(when=JUNK)
def test_a_bad_point_in_time_is_named(inventory_file, when):
    assume(not when.startswith("-"))
    try:
        from datetime import datetime

        datetime.fromisoformat(when.replace("Z", "+00:00"))
        assume(False)
    except ValueError:
        pass
    code, err = run_cli(["drill", "--env", inventory_file, "--point-in-time", when])
    assert code == 2 and "--point-in-time" in err and "Traceback" not in err, err


@SETTINGS
@given(
    command=st.sampled_from(["failover", "failback", "drill", "status", "report", "list", "verify-report", *ACTIONS]),
    flag=st.from_regex(r"\A--[a-z][a-z-]{1,15}\Z"),
)
def test_an_unknown_option_is_named(inventory_file, command, flag):
    known = {
        "--env",
        "--to",
        "--emergency",
        "--dry-run",
        "--requester",
        "--reason",
        "--wait",
        "--json",
        "--as",
        "--key",
        "--source",
        "--point-in-time",
        "--markdown",
        "--environment",
        "--status",
        "--limit",
        "--help",
        "--gate",
        "--full",
        "--procedure",
    }
    assume(not any(k.startswith(flag) for k in known))  # argparse accepts unambiguous prefixes
    argv = {
        "failover": ["failover", "--to", "westeurope"],
        "failback": ["failback", "--to", "westeurope"],
        "drill": ["drill"],
        "list": ["list"],
        "verify-report": ["verify-report", "r.json", "--env", inventory_file],
    }.get(command, [command, "wid", "--as", "bob", "--reason", "r"])
    code, err = run_cli([*argv, flag, "x"])
    assert code == 2 and flag in err and "Traceback" not in err, err


@SETTINGS
@given(action=st.sampled_from(ACTIONS))
def test_an_action_without_who_is_named(action):
    code, err = run_cli([action, "opsflow-prod"])
    assert code == 2 and "--as" in err, err


@SETTINGS
@given(action=st.sampled_from(ACTIONS), key=JUNK)
def test_a_missing_key_file_is_named_before_anything_is_sent(inventory_file, action, key, tmp_path):
    assume(not key.startswith("-") and "\n" not in key)
    from pathlib import Path

    assume(not Path(tmp_path / key).exists())
    code, err = run_cli([action, "opsflow-prod", "--as", "bob", "--reason", "r", "--key", str(tmp_path / key)])
    # The workflow's inventory is read from Temporal first (unreachable here: 1) or the key file is refused (2);
    # in both cases nothing was sent, and there is no traceback.
    assert code in (1, 2) and "Traceback" not in err and err.startswith("error:"), err


def test_verify_report_bad_files(tmp_path, inventory_file):
    missing = tmp_path / "nope.json"
    assert run_cli(["verify-report", str(missing), "--env", inventory_file])[0] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, err = run_cli(["verify-report", str(bad), "--env", inventory_file])
    assert code == 2 and "not JSON" in err
    bad.write_text('{"signatures": [{"action": "approve"}]}')
    code, err = run_cli(["verify-report", str(bad), "--env", inventory_file])
    assert code == 2 and "malformed" in err
