"""How the doctor looks at the machine: commands with a timeout, files, HTTP on loopback. Tests pass a fake."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class Result:
    rc: int  # 127: the program is not installed; 124: it ran past its timeout
    out: str
    err: str = ""


class Probe:
    def which(self, program: str) -> str | None:
        return shutil.which(program)

    def run(self, argv: list[str], timeout: float = 20) -> Result:
        if self.which(argv[0]) is None and "/" not in argv[0]:
            return Result(127, "", f"{argv[0]}: not installed")
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return Result(124, "", f"{argv[0]}: no answer within {timeout:g} s")
        except OSError as e:
            return Result(126, "", f"{argv[0]}: {e}")
        return Result(p.returncode, p.stdout, p.stderr)

    def http_get(self, url: str, timeout: float = 3) -> tuple[int | None, str]:
        """(status, body); status None when nothing answered (refused, timed out)."""
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback URLs built here
                return r.status, r.read(4096).decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read(4096).decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:
            return None, str(getattr(e, "reason", e))
