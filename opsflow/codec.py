"""Payload encryption: what the Temporal cluster stores (inputs with the inventory, reports, details) is
AES-256-GCM ciphertext; only the CLI, the workers and the codec server hold the key.

Keys come from a secret reference, never from the inventory (which is itself encrypted):

    OPSFLOW_CODEC_KEY='{env: OPSFLOW_CODEC_KEYS}'        a secret reference (YAML/JSON), or
    OPSFLOW_CODEC_KEY_FILE=/etc/opsflow/codec.keys       a file

The secret holds one or more keys, `KEY_ID:BASE64_32_BYTES`, separated by commas or newlines. The first is
the current key (new payloads); every listed key decrypts. Each payload carries its key id in metadata, so
keys rotate by putting the new key first and keeping the old one until old histories no longer matter.
Make a key with `opsflow codec-key` (or: `echo "k$(date +%Y%m):$(head -c32 /dev/urandom | base64)"`).
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_ENV = "OPSFLOW_CODEC_KEY"
KEY_FILE_ENV = "OPSFLOW_CODEC_KEY_FILE"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CodecConfigError(ValueError):
    """The codec key configuration is unusable; the message says which setting."""


@dataclass(frozen=True)
class CodecKey:
    id: str
    key: bytes


def parse_keys(text: str, source: str = "codec key") -> list[CodecKey]:
    keys = []
    for item in re.split(r"[,\n]", text):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key_id, sep, b64 = item.partition(":")
        if not sep or not _KEY_ID.match(key_id):
            raise CodecConfigError(
                f"{source}: expected KEY_ID:BASE64 (key id of letters, digits, . _ -), got {item[:12]}..."
            )
        try:
            raw = base64.b64decode(b64.strip(), validate=True)
        except ValueError:
            raise CodecConfigError(f"{source}: key {key_id!r} is not base64") from None
        if len(raw) != 32:
            raise CodecConfigError(f"{source}: key {key_id!r} is {len(raw)} bytes; AES-256 needs 32")
        keys.append(CodecKey(key_id, raw))
    if not keys:
        raise CodecConfigError(f"{source}: no key")
    if len({k.id for k in keys}) != len(keys):
        raise CodecConfigError(f"{source}: a key id is listed twice")
    return keys


def new_key_line(key_id: str) -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"


class UnencryptedPayloadError(ValueError):
    """A process holding codec keys received a payload that is not encrypted."""


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM per payload; the key id is both in the metadata and authenticated (associated data).

    Decoding refuses a payload that is not encrypted: with encryption on, a clear payload did not come from a
    process holding the key (a `temporal workflow signal` or a client without it), and its content reaching a
    workflow unchecked is what encryption is there to rule out. The SDK reads no payload of ours unencrypted
    (search attributes never pass through a codec). `accept_plaintext` is for display only (the codec server
    showing histories recorded before encryption was turned on).
    """

    def __init__(self, keys: Sequence[CodecKey], accept_plaintext: bool = False):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not keys:
            raise CodecConfigError("no codec key")
        self.current = keys[0]
        self._ciphers = {k.id: AESGCM(k.key) for k in keys}
        self.accept_plaintext = accept_plaintext

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self.current.id]
        out = []
        for p in payloads:
            nonce = os.urandom(12)
            data = nonce + cipher.encrypt(nonce, p.SerializeToString(), self.current.id.encode())
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID: self.current.id.encode()}, data=data))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                if self.accept_plaintext:
                    out.append(p)
                    continue
                encoding = p.metadata.get("encoding", b"").decode(errors="replace") or "none"
                raise UnencryptedPayloadError(
                    f"received an unencrypted payload (encoding {encoding!r}) while payload encryption is on: it was "
                    "written by a client without the codec key, or before encryption was turned on (let such "
                    "procedures finish, or read them with a process that has no key)")
            key_id = p.metadata.get(KEY_ID, b"").decode()
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise ValueError(f"payload encrypted with key id {key_id!r}, which this process does not have "
                                 f"(known: {', '.join(self._ciphers)})")
            plain = cipher.decrypt(p.data[:12], p.data[12:], key_id.encode())
            out.append(Payload.FromString(plain))
        return out


def configured_keys(environ: dict[str, str] | None = None) -> list[CodecKey] | None:
    """The keys from OPSFLOW_CODEC_KEY (a secret reference) or OPSFLOW_CODEC_KEY_FILE; None when neither is set."""
    env = os.environ if environ is None else environ
    ref_text, key_file = env.get(KEY_ENV), env.get(KEY_FILE_ENV)
    if ref_text and key_file:
        raise CodecConfigError(f"set one of {KEY_ENV} and {KEY_FILE_ENV}, not both")
    if key_file:
        try:
            return parse_keys(open(key_file).read(), KEY_FILE_ENV)
        except OSError as e:
            raise CodecConfigError(f"{KEY_FILE_ENV}={key_file}: {e.strerror}") from None
    if ref_text:
        import yaml
        from pydantic import ValidationError

        from opsflow.inventory import SecretRef

        try:
            ref = SecretRef.model_validate(yaml.safe_load(ref_text))
        except (yaml.YAMLError, ValidationError) as e:
            raise CodecConfigError(f"{KEY_ENV} must be a secret reference such as '{{env: VAR}}' or "
                                   f"'{{aws_secrets_manager: {{secret_id: ID}}}}': {str(e).splitlines()[0]}") from None
        from temporalio.exceptions import ApplicationError

        from activities.secrets import resolve

        try:
            return parse_keys(resolve(ref), f"{KEY_ENV} ({ref.describe()})")
        except ApplicationError as e:
            raise CodecConfigError(f"{KEY_ENV}: {e.message}") from None
    return None


def codec_from_env(environ: dict[str, str] | None = None) -> EncryptionCodec | None:
    keys = configured_keys(environ)
    return EncryptionCodec(keys) if keys else None


def key_ids(keys: Iterable[CodecKey]) -> list[str]:
    return [k.id for k in keys]
