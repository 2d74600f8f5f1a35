"""Refuse secrets written into an inventory in plain text, naming the field.

The inventory travels inside workflow inputs (the Temporal history, readable by everyone with namespace
access), so it may only say where a secret lives (`{env: VAR}`, `{file: PATH}`, `{aws_secrets_manager: ...}`,
`{azure_key_vault: ...}`). `load_inventory` runs this scan on the raw mapping before pydantic sees it, so it also
catches a secret in a field that is otherwise free text (a smoke URL with `?token=`, a DSN with a password).

Strings are parsed the way their consumers will parse them, not matched loosely: a DSN with libpq's own parser
(psycopg's `conninfo_to_dict`: `postgresql://:pw@h/db`, `?pass%77ord=x` and `sslpassword=` are passwords to
libpq), a URL with `urllib.parse` (credentials in the userinfo, in the query or the fragment). Bare tokens of
well-known shapes (AWS access key ids, GitHub tokens, bearer tokens, Slack tokens) are flagged wherever they are.
"""

from __future__ import annotations

import re
from typing import Any, Iterator
from urllib.parse import unquote_plus, urlsplit

from opsflow.sections import no_password_in_dsn

REF_HINT = ("give a secret reference instead: {env: VAR}, {file: PATH}, {aws_secrets_manager: {secret_id: ...}} "
            "or {azure_key_vault: {vault_url: ..., name: ...}}")

# Keys whose value is a secret itself; a mapping there is a secret reference (checked by SecretRef).
_SECRET_KEYS = {"password", "passwd", "sslpassword", "token", "api_key", "apikey", "secret", "client_secret",
                "routing_key", "integration_key", "webhook", "webhook_url", "access_key", "secret_access_key",
                "private_key", "auth_token", "bearer_token", "access_token", "refresh_token", "private_token",
                "session_token"}

# Keys whose value is a libpq connection string.
_DSN_KEYS = {"dsn", "conninfo", "connection_string", "database_url"}
# libpq connection parameters that are secrets (passfile, sslkey are paths to them: fine).
_DSN_SECRET_PARAMS = ("password", "sslpassword")

# URL query (or fragment) parameters that carry a credential, compared lower-cased.
_QUERY_SECRET_KEYS = {"password", "passwd", "pwd", "pass", "token", "access_token", "refresh_token", "id_token",
                      "auth_token", "private_token", "api_key", "apikey", "api-key", "key", "secret", "client_secret",
                      "sig", "signature", "x-amz-signature", "x-amz-security-token", "x-goog-signature", "code",
                      "routing_key"}

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s<>\"'`]+")
_POSTGRES_URI = re.compile(r"^\s*postgres(ql)?://", re.I)
_KEY_VALUE = re.compile(r"^\s*[A-Za-z_]+\s*=")
_BEARER = re.compile(r"\bBearer\s+([A-Za-z0-9\-._~+/]+=*)")
_PLAIN_WORD = re.compile(r"[A-Z]?[a-z]+")

_TOKENS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "an AWS access key id"),
    (re.compile(r"(?<![A-Za-z0-9_])(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"), "a GitHub token"),
    (re.compile(r"hooks\.slack\.com/|discord(app)?\.com/api/webhooks/|\.webhook\.office\.com/", re.I),
     "a plaintext webhook URL"),
    (re.compile(r"events\.pagerduty\.com|\bxox[abposr]-[0-9A-Za-z-]{8,}"), "a plaintext PagerDuty/Slack token or URL"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
]

# Text that is neither a DSN nor a URL urllib can split (a relative URL, a shell line) still must not hold these.
_TEXT_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"://[^/@\s:]*:[^/@\s]+@"), "a password in a URL (user:password@host)"),
    (re.compile(r"[?&;#](" + "|".join(re.escape(k) for k in sorted(_QUERY_SECRET_KEYS)) + r")=[^&;#\s]", re.I),
     "a credential in a URL query"),
    (re.compile(r"(^|\s)(ssl)?password\s*=", re.I), "a password in a connection string"),
]


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


def dsn_secret(text: str) -> str | None:
    """What libpq would read as a secret in this connection string; None when none (or libpq cannot parse it)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(text)
    except (ProgrammingError, ValueError, TypeError):
        return None
    for name in _DSN_SECRET_PARAMS:
        if params.get(name):
            return f"a password in a DSN (libpq reads {name!r} from it)"
    return None


def url_secret(url: str) -> str | None:
    """A credential in this URL's userinfo, query or fragment parameters; None when it holds none."""
    try:
        parts = urlsplit(url.strip())
        password = parts.password
    except ValueError:  # an unparseable netloc (a stray '[')
        return None
    if password:
        return "a password in a URL (user:password@host)"
    # OAuth's implicit flow puts access_token= in the fragment; ';key=value' path parameters are read by some servers.
    for section in (parts.query, parts.fragment, parts.path.partition(";")[2]):
        for item in re.split(r"[&;]", section):
            key, sep, value = item.partition("=")
            if sep and value and unquote_plus(key).strip().lower() in _QUERY_SECRET_KEYS:
                return f"a credential in a URL query ({unquote_plus(key).strip()}=)"
    return None


def text_secret(text: str, dsn: bool = False) -> str | None:
    """What secret this text holds in plain text (the first found), or None. `dsn`: the field is a connection
    string, so libpq's reading of it decides."""
    if dsn or _POSTGRES_URI.match(text) or _KEY_VALUE.match(text):
        found = dsn_secret(text)
        if found:
            return found
    for url in _URL.findall(text):
        found = url_secret(url)
        if found:
            return found
    for pattern, what in _TOKENS:
        if pattern.search(text):
            return what
    for m in _BEARER.finditer(text):
        token = m.group(1)
        if len(token) >= 8 and not _PLAIN_WORD.fullmatch(token):  # "Bearer authentication" is prose
            return "a bearer token"
    for pattern, what in _TEXT_PATTERNS:
        if pattern.search(text):
            return what
    return None


def _inventory_validator_refuses(dsn: str) -> bool:
    try:
        no_password_in_dsn(dsn)
    except ValueError:
        return True
    return False


def plaintext_secrets(raw: Any) -> list[str]:
    """'field.path: what is wrong' for every plaintext secret in a raw inventory mapping."""
    found = []
    for path, value in _walk(raw, ()):
        where = ".".join(str(p) for p in path) or "(top level)"
        key = str(path[-1]).lower() if path else ""
        if len(path) == 3 and path[0] == "notifications" and key == "url":
            found.append(f"{where}: a notification URL is a secret (anyone holding it can post); "
                         "name where it lives: url_secret: {env: VAR} (or file, aws_secrets_manager, azure_key_vault)")
            continue
        if key in _SECRET_KEYS and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found.append(f"{where}: a secret in plain text; {REF_HINT}")
            continue
        if isinstance(value, str):
            dsn = key in _DSN_KEYS or key.endswith("_dsn")
            if dsn and _inventory_validator_refuses(value):
                continue  # the model's own validator names the field with its provider (…database.postgres.dsn)
            what = text_secret(value, dsn=dsn)
            if what:
                found.append(f"{where}: {what}; {REF_HINT}")
    return found
