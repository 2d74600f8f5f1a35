"""opsflow.client without a server: which inventory is used, and saying so; the CLI and worker exit 2 without one."""

from __future__ import annotations

import json
import os

import pytest

from opsflow.client import ClientError, inventory_path, inventory_paths, lab_state


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_lab(home, tmp_path, temporal_pid: int) -> str:
    """A lab as `opsflow lab up` leaves it: the pointer, and lab.json naming its Temporal process."""
    lab_dir = tmp_path / "lab"
    lab_dir.mkdir()
    inventory = lab_dir / "inventory.yaml"
    (lab_dir / "lab.json").write_text(
        json.dumps(
            {
                "ready": True,
                "inventory": str(inventory),
                "temporal": {"address": "127.0.0.1:1"},
                "processes": {"temporal": {"pid": temporal_pid, "log": "x"}},
            }
        )
    )
    home.mkdir(parents=True, exist_ok=True)
    (home / "current-lab").write_text(str(lab_dir))
    return str(inventory)


def test_no_env_and_no_lab_is_a_clear_error(home):
    with pytest.raises(ClientError) as exc:
        inventory_path(None)
    assert exc.value.code == 2 and "pass --env FILE" in str(exc.value) and "no lab is running" in str(exc.value)


def test_the_running_labs_inventory_is_used_and_announced(home, tmp_path):
    expected = fake_lab(home, tmp_path, os.getpid())
    said = []
    assert inventory_path(None, said.append) == expected
    assert said == [f"using the lab's inventory at {expected} (pass --env FILE for another environment)"]
    assert inventory_path("mine.yaml", said.append) == "mine.yaml" and len(said) == 1  # given: nothing said


def test_a_lab_whose_temporal_is_gone_is_not_used(home, tmp_path):
    fake_lab(home, tmp_path, 2**22 + 12345)  # no such process
    assert lab_state() is None
    with pytest.raises(ClientError):
        inventory_path(None)


def test_a_directory_stands_for_its_inventories(tmp_path, home):
    d = tmp_path / "fleet"
    d.mkdir()
    for name in ("b.yaml", "a.yaml", "notes.txt"):
        (d / name).write_text("{}")
    assert inventory_paths([str(d), "c.yaml"]) == [str(d / "a.yaml"), str(d / "b.yaml"), "c.yaml"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientError, match="no \\*.yaml inventory"):
        inventory_paths([str(tmp_path / "empty")])


def test_cli_and_worker_exit_2_without_an_inventory(home, capsys):
    from starters.cli import main as cli
    from worker.main import main as worker

    assert cli(["failover", "--to", "westeurope"]) == 2
    assert "no inventory: pass --env FILE" in capsys.readouterr().err
    assert worker([]) == 2
    assert "no inventory: pass --env FILE" in capsys.readouterr().err


def test_a_worker_refuses_two_inventories_of_one_environment(home, tmp_path, capsys):
    import yaml

    from tests.workflow.conftest import inventory_dict
    from worker.main import main as worker

    paths = []
    for i in range(2):
        p = tmp_path / f"inv{i}.yaml"
        p.write_text(yaml.safe_dump({**inventory_dict(), "environment": "same"}))
        paths += ["--env", str(p)]
    assert worker(paths) == 2
    assert "two inventories describe the same environment: same" in capsys.readouterr().err
