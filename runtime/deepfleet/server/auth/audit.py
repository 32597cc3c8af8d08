"""The audit log: one JSON object per line with the source documents' fields (timestamp, event, user, model_id,
ip, severity) plus event details. Callers pass only what they decide to record: never a token, a prompt or a
completion (the events below carry reasons, paths and status codes). Each line is one O_APPEND write, so lines
from concurrent writers never interleave, and the file is created mode 0640 (owner writes, group reads)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

from deepfleet.security.errors import SecurityConfigError

log = logging.getLogger("deepfleet.audit")

FILE_MODE = 0o640
SEVERITY = {  # event -> severity, so equal events always carry the same one
    "MODEL_LOADED": "info", "MODEL_UNLOADED": "info", "MODEL_LOAD_FAILED": "error", "SERVER_STARTED": "info",
    "POLICY_RELOADED": "warning", "POLICY_RELOAD_FAILED": "error",
    "AUTH_FAILED": "warning", "ACCESS_DENIED": "warning", "RATE_LIMITED": "warning",
    "ABNORMAL_REQUEST": "warning", "AUDIT_READ": "info", "ADMIN_ACTION_FAILED": "error",
}


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            except OSError as e:
                raise SecurityConfigError(f"audit.path {path}: {e.strerror}") from None

    def event(self, event: str, *, user: str | None = None, model_id: str | None = None, ip: str | None = None,
              **details: Any) -> dict[str, Any]:
        record = {
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event, "user": user, "model_id": model_id, "ip": ip, "severity": SEVERITY[event], **details,
        }
        line = json.dumps(record, sort_keys=False, default=str) + "\n"
        if self._fd is None:
            log.info("audit %s", line.rstrip())
        else:
            with self._lock:
                os.write(self._fd, line.encode())
        return record

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` events (for the auditor's read_logs endpoint)."""
        if self.path is None:
            return []
        with open(self.path, encoding="utf-8") as f:
            lines = deque(f, maxlen=limit)
        return [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
