"""What every CLI command shares: printing, and the errors that carry exit codes (opsflow.client's)."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel

from opsflow.client import ClientError, inventory_path  # noqa: F401  (the schedule commands take them from here)

CliError = ClientError  # one error type with exit codes for the client API and the CLI


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        print(json.dumps(data, indent=2, default=str))
    elif text is not None:
        print(text)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
