"""What many test modules share: waiting on a condition (never a sleep where a condition serves), a person's SSH
key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition", *, interval: float = 0.1
) -> T:
    """The predicate's first truthy value, polled every `interval` seconds; AssertionError naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def eventually_async(predicate: Callable[[], Awaitable[T]], timeout: float = 60.0, what: str = "condition", *,
                           interval: float = 0.1) -> T:
    """`eventually` for a coroutine predicate (a Temporal query, a describe): awaited, not blocking the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def ssh_key_pair(folder: Path, name: str) -> tuple[str, str]:
    """A new ed25519 key for `name`: (the private key file, in OpenSSH format; the public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    path = folder / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return str(path), f"{pub} {name}@laptop"
