"""rclone, the one tool that moves weights between object stores and hosts (Debian's package on every host).

Remotes are named in an rclone config file (credentials live there, mode 0600, written by the model_store role);
an ad-hoc HTTP remote reads a site cache that `rclone serve http` publishes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# rclone's S3 client fails with "LoadCustomCABundleError" whenever AWS_CA_BUNDLE is set (its HTTP transport
# cannot take the SDK's bundle): the bundle is passed as --ca-cert instead.
_CA_ENV = "AWS_CA_BUNDLE"


class RcloneError(Exception):
    """rclone failed; the message holds its last error lines."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the listed directory, POSIX
    size: int


def http_remote(url: str, path: str) -> str:
    """An rclone path into a directory served over HTTP (e.g. a site cache), with no config entry."""
    return f":http,url='{url.rstrip('/')}/':{path}"


@dataclass(frozen=True)
class Rclone:
    config: Path | None = None  # rclone.conf with the remotes; None: rclone's own default lookup
    transfers: int = 8
    bwlimit: str | None = None  # rclone syntax, e.g. "200M" or "08:00,100M 20:00,off"
    timeout_s: int = 30  # connection and idle timeout: an unreachable store fails fast

    def _base(self) -> tuple[list[str], dict[str, str]]:
        exe = shutil.which("rclone")
        if exe is None:
            raise RcloneError("rclone is not installed (Debian package: rclone)")
        args = [exe, "--contimeout", f"{self.timeout_s}s", "--timeout", f"{self.timeout_s}s",
                "--low-level-retries", "3"]
        if self.config is not None:
            args += ["--config", str(self.config)]
        env = dict(os.environ)
        if ca := env.pop(_CA_ENV, None):
            args += ["--ca-cert", ca]
        return args, env

    def _exec(self, args: list[str]) -> subprocess.CompletedProcess:
        base, env = self._base()
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, check=False)

    def run(self, *args: str) -> str:
        proc = self._exec(list(args))
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if "NOTICE: Config file" not in ln]
            raise RcloneError(f"rclone {args[0]} failed (exit {proc.returncode}): " + " | ".join(lines[-3:]))
        return proc.stdout

    def list_files(self, path: str) -> list[RemoteFile]:
        """Every file under path, recursively. An absent prefix lists empty on S3 (it has no directories)."""
        entries = json.loads(self.run("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime", path))
        return [RemoteFile(e["Path"], int(e["Size"])) for e in entries]

    def _transfer_flags(self) -> list[str]:
        flags = ["--transfers", str(self.transfers), "--retries", "3"]
        return flags + (["--bwlimit", self.bwlimit] if self.bwlimit else [])

    def mirror(self, src: str, dst: str, checksum: bool = False) -> SyncReport:
        """Make dst hold exactly src's files and say what changed. Files already there with the same size and time
        (or checksum) are skipped, so a transfer killed halfway resumes with what it had not finished; leftovers of
        the killed run (rclone's .partial files) are deleted."""
        proc = self._exec(["sync", src, dst, *(["--checksum"] if checksum else []), *self._transfer_flags(),
                           "--use-json-log", "--log-level", "INFO"])
        entries = []
        for line in proc.stderr.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        if proc.returncode != 0:
            errors = [e.get("msg", "") for e in entries if e.get("level") == "error"] or proc.stderr.splitlines()
            raise RcloneError(f"rclone sync failed (exit {proc.returncode}): " + " | ".join(errors[-3:]))
        report = SyncReport()
        for e in entries:
            obj, msg = e.get("object"), e.get("msg", "")
            if obj and msg.startswith("Copied"):
                report.copied.append(obj)
            elif obj and msg.startswith("Deleted"):
                report.deleted.append(obj)
        return report


@dataclass
class SyncReport:
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
