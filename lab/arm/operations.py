"""Long-running operations, as ARM runs them and the SDK's ARMPolling expects: 202 with Azure-AsyncOperation and
Location headers, an operation resource going InProgress -> Succeeded | Failed, then the SDK's final GET of the
resource. They last at least the `lro_seconds` setting (slow operations for tests).

    GET /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/azureAsyncOperation/{id}
    GET /subscriptions/{sub}/providers/Microsoft.DBforPostgreSQL/locations/{loc}/operationResults/{id}
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable

from lab.arm.common import PG_NS, ArmError, now_iso
from lab.arm.state import ArmState

log = logging.getLogger("opsflow.lab.arm_emulator")

Answer = tuple[int, Any, dict]


class Operations(ArmState):
    def start_operation(self, srv: dict, kind: str, work: Callable[[dict], None], resource_path: str | None, base: str,
                        api_version: str, on_done: Callable[[str, dict | None], None] | None = None,
                        prepare: Callable[[], None] | None = None) -> Answer:
        """Run `work(op)` in a thread as a long-running operation on `srv`. `prepare()` runs under the lock once the
        server is known to be free (mark it provisioning...); `on_done(status, error)` runs under the lock when the
        operation ends, before the server is free again. resource_path None: no final resource (a delete)."""
        with self.lock:
            if srv["busy_op"] is not None:
                running = self.operations[srv["busy_op"]]["kind"]
                raise ArmError(409, "AnotherOperationInProgress",
                               f"Another operation ({running}) is in progress on server '{srv['name']}'; "
                               "retry when it has finished.")
            if prepare is not None:
                prepare()
            op_id = str(uuid.uuid4())
            op = {
                "name": op_id,
                "status": "InProgress",
                "startTime": now_iso(),
                "kind": kind,
                "server": srv["name"],
                "location": srv["location"],
                "resource_path": resource_path,
            }
            self.operations[op_id] = op
            srv["busy_op"] = op_id
        self.persist()
        threading.Thread(target=self._run_operation, args=(srv, op, work, on_done), name=f"arm-op-{op_id[:8]}",
                         daemon=True).start()
        headers = self.operation_headers(op, base, api_version)
        return 202, None, headers

    def operation_headers(self, op: dict, base: str, api_version: str) -> dict:
        prefix = f"{base}/subscriptions/{self.subscription}/providers/{PG_NS}/locations/{op['location']}"
        headers = {
            "Azure-AsyncOperation": f"{prefix}/azureAsyncOperation/{op['name']}?api-version={api_version}",
            "Location": f"{prefix}/operationResults/{op['name']}?api-version={api_version}",
        }
        if self.settings.get("lro_retry_after") is not None:
            headers["Retry-After"] = str(int(self.settings["lro_retry_after"]))
        return headers

    def _run_operation(self, srv: dict, op: dict, work: Callable[[dict], None],
                       on_done: Callable[[str, dict | None], None] | None = None) -> None:
        started = time.monotonic()
        status, error = "Succeeded", None
        try:
            work(op)
        except ArmError as e:
            status, error = "Failed", {"code": e.code, "message": e.message}
        except Exception as e:  # noqa: BLE001
            log.exception("operation %s failed", op["name"])
            status, error = "Failed", {"code": "InternalServerError", "message": f"{type(e).__name__}: {e}"}
        remaining = float(self.settings["lro_seconds"]) - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        with self.lock:
            op["status"] = status
            op["endTime"] = now_iso()
            op.pop("percentComplete", None)
            if error:
                op["error"] = error
            if on_done is not None:
                try:
                    on_done(status, error)
                except Exception:  # noqa: BLE001
                    log.exception("operation %s: bookkeeping after the operation failed", op["name"])
            srv["busy_op"] = None
            self.probe_cache.pop(srv["name"].lower(), None)
        log.info("operation %s (%s on %s): %s %s", op["name"], op["kind"], srv["name"], status, error or "")
        self.persist()

    def operation_status(self, op_id: str) -> dict:
        with self.lock:
            op = self.operations.get(op_id)
            if op is None:
                raise ArmError(404, "ResourceNotFound", f"The operation '{op_id}' was not found.")
            body = {k: op[k] for k in ("name", "status", "startTime") if k in op}
            for k in ("endTime", "error", "percentComplete"):
                if k in op:
                    body[k] = op[k]
            return body

    def handle_operation(self, method: str, kind: str, op_id: str, path: str, base: str, api_version: str) -> Answer:
        """GET .../locations/{loc}/{azureAsyncOperation|operationResults}/{id}."""
        if method != "GET":
            raise ArmError(405, "MethodNotAllowed", f"The method {method} is not allowed on an operation.")
        if kind == "azureasyncoperation":
            status_body = self.operation_status(op_id)
            headers = {}
            if status_body["status"] == "InProgress" and self.settings.get("lro_retry_after") is not None:
                headers["Retry-After"] = str(int(self.settings["lro_retry_after"]))
            return 200, status_body, headers
        if kind == "operationresults":
            status_body = self.operation_status(op_id)
            with self.lock:
                op = self.operations[op_id]
            if status_body["status"] == "InProgress":
                return 202, None, self.operation_headers(op, base, api_version)
            if status_body["status"] == "Failed":
                err = status_body.get("error") or {}
                raise ArmError(400, err.get("code", "OperationFailed"), err.get("message", "The operation failed."))
            if not op.get("resource_path"):
                return 204, None, {}  # a delete: nothing to return
            return 200, self.resource_at(op["resource_path"]), {}
        raise ArmError(404, "NotFound", f"No HTTP resource was found that matches the request URI '{path}'.")

    def resource_at(self, resource_path: str) -> dict:
        """The resource an operation made or changed (the SDK's final GET): implemented by world.World."""
        raise NotImplementedError
