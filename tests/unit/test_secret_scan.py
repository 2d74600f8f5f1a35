"""The plaintext-secret scan: DSNs as libpq reads them, URLs as urllib splits them, well-known token shapes;
each finding names the field, and ordinary inventory text passes."""

from __future__ import annotations

import copy

import pytest
import yaml

from opsflow.inventory import InventoryError, load_inventory
from opsflow.secret_scan import dsn_secret, plaintext_secrets, text_secret, url_secret
from tests.workflow.conftest import inventory_dict


@pytest.mark.parametrize("dsn, param", [
    ("postgresql://:pw@h/db", "password"),  # no user: a pattern wanting user:password@ missed it
    ("postgresql://h/db?pass%77ord=x", "password"),  # libpq decodes the key
    ("postgres://ops@h/db?sslpassword=k", "sslpassword"),
    ("host=h password=hunter2", "password"),
    ("host=h dbname=app sslpassword='key pass'", "sslpassword"),
    ("host=h   PASSWORD = x", None),  # libpq's keys are case-sensitive: it would refuse this DSN, not read a password
])
def test_dsn_passwords_as_libpq_reads_them(dsn, param):
    found = dsn_secret(dsn)
    if param is None:
        assert found is None
    else:
        assert found is not None and repr(param) in found


@pytest.mark.parametrize("dsn", ["host=db port=5432 user=ops dbname=postgres",
                                 "postgresql://ops@db/app?sslmode=require",
                                 "postgresql://db/app?passfile=/run/pgpass", "postgresql://u:@db/app", "not a dsn"])
def test_dsns_without_a_password_pass(dsn):
    assert dsn_secret(dsn) is None


@pytest.mark.parametrize("url", [
    "https://ops:s3cret@api.example/health",
    "https://api.example/cb?CLIENT_SECRET=abc",
    "https://api.example/x?access_token=abc",
    "https://api.example/x?key=AIzaSy",
    "https://gitlab.example/api/v4/projects?private_token=glpat",
    "https://b.s3.amazonaws.com/o?X-Amz-Algorithm=AWS4&X-Amz-Signature=ab12",
    "https://api.example/x?Token=abc",
    "https://api.example/x?pass%77ord=abc",  # urllib decodes the key as the server will
    "https://acct.blob.core.windows.net/c/b?sv=2022&sig=abc%3D",
    "https://app.example/#access_token=abc&token_type=bearer",  # OAuth's implicit flow
    "https://api.example/x;sig=abc",
])
def test_url_credentials_are_found(url):
    assert url_secret(url) is not None
    assert text_secret(f"check {url} daily") is not None  # inside prose too


@pytest.mark.parametrize("url", ["https://api.example/health", "https://api.example/x?key=",
                                 "https://user@host.example/", "https://api.example/x?monkey=1&keyboard=2",
                                 "http://[::1/x"])
def test_urls_without_credentials_pass(url):
    assert url_secret(url) is None


@pytest.mark.parametrize("text, what", [
    ("AKIAIOSFODNN7EXAMPLE", "AWS access key id"),
    ("creds ASIAY34FZKBOKMUTVV7A here", "AWS access key id"),
    ("ghp_" + "a1B2" * 9, "GitHub token"),
    ("gho_" + "Z" * 36, "GitHub token"),
    ("ghs_" + "0" * 36, "GitHub token"),
    ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "GitHub token"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "bearer token"),
    ("bearer-less Bearer 0123456789abcdef", "bearer token"),
    ("https://hooks.slack.com/services/T000/B000/XXXX", "webhook URL"),
    ("xoxb-1234567890-abcdefghij", "Slack token"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "private key"),
])
def test_token_shapes_are_found(text, what):
    found = text_secret(text)
    assert found is not None and what in found


@pytest.mark.parametrize("text", ["Bearer authentication is used", "AKIA1234", "ghp_short", "Bearer ${TOKEN}",
                                  "the github_pat_ prefix", "eastus failover at 02:00 UTC", "ep-eastus"])
def test_ordinary_text_passes(text):
    assert text_secret(text) is None


def test_findings_name_the_field_path():
    raw = {
        "regions": {"eastus": {"database": {"dsn": "postgresql://:pw@db/app"},
                               "smoke_urls": ["https://ok.example/health", "https://x.example/?X-Amz-Signature=1"]}},
        "notes": "deploy key AKIAIOSFODNN7EXAMPLE",
        "extra": [{"header": "Bearer 9f8e7d6c5b4a"}],
    }
    found = plaintext_secrets(raw)
    assert [f.split(":")[0] for f in found] == ["regions.eastus.database.dsn", "regions.eastus.smoke_urls.1", "notes",
                                                "extra.0.header"]
    assert "a password in a DSN" in found[0] and "X-Amz-Signature" in found[1]
    assert all("{env: VAR}" in f for f in found)


@pytest.mark.parametrize("dsn", ["postgresql://:pw@db/app", "postgresql://db/app?pass%77ord=x",
                                 "host=db sslpassword=k dbname=app"])
def test_a_loaded_inventory_refuses_what_libpq_would_read_as_a_password(tmp_path, dsn):
    data = copy.deepcopy(inventory_dict())
    data["regions"]["eastus"]["database"]["dsn"] = dsn
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InventoryError, match=r"regions\.eastus\.database\.dsn: a password in a DSN"):
        load_inventory(path)


def test_the_example_inventory_holds_no_secret():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "inventory.example.yaml"
    assert plaintext_secrets(yaml.safe_load(example.read_text())) == []
