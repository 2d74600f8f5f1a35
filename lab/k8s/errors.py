"""Errors as the Kubernetes API server reports them: a ``Status`` object with code, reason, message and details."""

from __future__ import annotations

import json
from typing import Any

from lab.k8s.resources import Obj, Resource


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> Obj:
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def status_details(res: Resource, name: str | None, **extra: Any) -> dict:
    d: dict = {"name": name, "kind": res.plural} if name else {"kind": res.plural}
    if res.group:
        d["group"] = res.group
    d.update(extra)
    return d


def not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{res.qualified} "{name}" not found', status_details(res, name))


def invalid(res: Resource, name: str, field: str, value: Any, why: str) -> ApiError:
    msg = f"{field}: Invalid value: {json.dumps(value)}: {why}"
    return ApiError(422, "Invalid", f'{res.qualified_kind} "{name}" is invalid: {msg}',
                    {"name": name, "group": res.group, "kind": res.kind,
                     "causes": [{"reason": "FieldValueInvalid", "message": f"Invalid value: {json.dumps(value)}: {why}",
                                 "field": field}]})


def conflict(res: Resource, name: str) -> ApiError:
    return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.qualified} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    status_details(res, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)
