"""The audit log: one JSON object per line with the source documents' fields (timestamp, event, user, model_id,
ip, severity) plus event details. Callers pass only what they decide to record: never a token, a prompt or a
completion (the events below carry reasons, paths and status codes). Each line is one O_APPEND write, so lines
from concurrent writers never interleave, and the file is created mode 0640 (owner writes, group reads).

Retention: the log survives rotation by others (logrotate's rename + create, or a removal), as
logging.handlers.WatchedFileHandler does: before each line the path is compared with the open file (device and
inode) and reopened when it no longer names it, so a line lands whole in either the old or the new file and none
is lost. With `max_bytes` the log also rotates itself (path -> path.1 -> ... -> path.<backups>, the oldest dropped)
before a line would take it past that size: the bound for hosts without logrotate (a pod's emptyDir)."""

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
    def __init__(self, path: Path | None, max_bytes: int | None = None, backups: int = 1) -> None:
        if backups < 1:
            raise SecurityConfigError(f"audit.backups: {backups}: at least 1 (the file rotated away is kept)")
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._fd: int | None = None
        self._lock = threading.Lock()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
            except OSError as e:
                raise SecurityConfigError(f"audit.path {path}: {e.strerror}") from None

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)

    def _reopen(self) -> None:
        old = self._fd
        self._open()
        os.close(old)

    def _moved(self) -> bool:
        """The path no longer names the open file (renamed or removed by a log rotation)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) != (own.st_dev, own.st_ino)

    def _rotate(self) -> None:
        """path.<i> -> path.<i+1> (the last one dropped), path -> path.1, a new empty path."""
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._reopen()

    def _write(self, data: bytes) -> None:
        if self._moved():
            self._reopen()
        if self.max_bytes is not None:
            size = os.fstat(self._fd).st_size
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
        os.write(self._fd, data)

    def event(self, event: str, *, user: str | None = None, model_id: str | None = None, ip: str | None = None,
              **details: Any) -> dict[str, Any]:
        record = {
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event, "user": user, "model_id": model_id, "ip": ip, "severity": SEVERITY[event], **details,
        }
        line = json.dumps(record, sort_keys=False, default=str) + "\n"
        with self._lock:
            if self._fd is None:  # no audit.path, or closed at shutdown
                log.info("audit %s", line.rstrip())
            else:
                self._write(line.encode())
        return record

    def tail(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` events of the current file (for the auditor's read_logs endpoint)."""
        if self.path is None:
            return []
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = deque(f, maxlen=limit)
        except FileNotFoundError:  # rotated away, the next event makes it again
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
