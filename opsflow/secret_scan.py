"""Refuse secrets written into an inventory in plain text, naming the field.

The inventory travels inside workflow inputs (the Temporal history, readable by everyone with namespace
access), so it may only say where a secret lives (`{env: VAR}`, `{file: PATH}`, `{aws_secrets_manager: ...}`,
`{azure_key_vault: ...}`). `load_inventory` runs this scan on the raw mapping before pydantic sees it, so it also catches a
secret in a field that is otherwise free text (a smoke URL with `?token=`, a DSN with a password).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

REF_HINT = "give a secret reference instead: {env: VAR}, {file: PATH}, {aws_secrets_manager: {secret_id: ...}} or {azure_key_vault: {vault_url: ..., name: ...}}"

# Keys whose value is a secret itself; a mapping there is a secret reference (checked by SecretRef).
_SECRET_KEYS = {"password", "passwd", "token", "api_key", "apikey", "secret", "client_secret", "routing_key", "integration_key",
                "webhook", "webhook_url", "access_key", "secret_access_key", "private_key", "auth_token", "bearer_token"}

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"://[^/@\s:]+:[^/@\s]*@"), "a password in a URL (user:password@host)"),
    (re.compile(r"[?&;](password|passwd|pwd|token|access_token|api_key|apikey|secret|sig|signature|code|routing_key)=", re.I),
     "a credential in a URL query"),
    (re.compile(r"(^|\s)password\s*=", re.I), "a password in a connection string"),
    (re.compile(r"hooks\.slack\.com/|discord(app)?\.com/api/webhooks/|\.webhook\.office\.com/", re.I), "a plaintext webhook URL"),
    (re.compile(r"events\.pagerduty\.com|\bxox[abposr]-[0-9A-Za-z-]{8,}"), "a plaintext PagerDuty/Slack token or URL"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
]


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))


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
            # DSN fields have their own password validator, which names the field with its provider.
            for pattern, what in _PATTERNS:
                if key == "dsn" and "password" in what:
                    continue
                if pattern.search(value):
                    found.append(f"{where}: {what}; {REF_HINT}")
                    break
    return found
