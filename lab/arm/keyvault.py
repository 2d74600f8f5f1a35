"""Key Vault's data plane, get-secret only (GET /secrets/{name}[/{version}]), served on the emulator's own
address. Like the real vault it first answers 401 with a bearer challenge naming the resource the token is for;
the SDK then asks its credential for that scope and retries. Secrets: the config's "key_vault_secrets"
({name: value}), and PUT /_emulator/vault/secrets/{name} {"value": ...}."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from lab.arm.operations import Answer
from lab.arm.state import ArmState


class KeyVault(ArmState):
    def load_secrets(self, config: dict) -> None:
        self.vault_secrets: dict[str, str] = dict(config.get("key_vault_secrets") or {})

    def set_secret(self, name: str, value: str) -> None:
        with self.lock:
            self.vault_secrets[name] = value

    def key_vault(self, method: str, path: str, auth: str | None, origin: str) -> Answer:
        if not auth or not auth.lower().startswith("bearer ") or not auth[7:].strip():
            challenge = f'Bearer authorization="https://login.microsoftonline.com/common", resource="{origin}"'
            missing = "AKV10000: Request is missing a Bearer or PoP token."
            return 401, {"error": {"code": "Unauthorized", "message": missing}}, {"WWW-Authenticate": challenge}
        if self.tokens and auth[7:].strip() not in self.tokens:
            return 401, {"error": {"code": "Unauthorized", "message": "AKV10032: Invalid issuer."}}, {}
        segs = [unquote(x) for x in path.strip("/").split("/")]
        if method != "GET" or len(segs) not in (2, 3):
            only = "the emulated vault serves GET /secrets/{name}[/{version}] only"
            return 405, {"error": {"code": "BadParameter", "message": only}}, {}
        with self.lock:
            value = self.vault_secrets.get(segs[1])
        if value is None:
            msg = f"A secret with (name/id) {segs[1]} was not found in this key vault."
            return 404, {"error": {"code": "SecretNotFound", "message": msg}}, {}
        version = segs[2] if len(segs) == 3 and segs[2] else "0" * 32
        stamp = int(time.time())
        body: dict[str, Any] = {
            "value": value, "id": f"{origin}/secrets/{segs[1]}/{version}",
            "attributes": {"enabled": True, "created": stamp, "updated": stamp,
                           "recoveryLevel": "Recoverable+Purgeable"},
        }
        return 200, body, {}
