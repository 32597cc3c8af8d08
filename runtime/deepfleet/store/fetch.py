"""One model revision from object storage to a local tier, verified before anything may use it.

Layout under a model's directory (e.g. /models/tiny-qwen2 on the hot tier, /cache/models/tiny-qwen2 on a site cache):

    <revision>/              complete copies whose files matched their SHA256 manifest
    .incoming-<revision>/    a transfer in progress; rclone skips the files already complete, so a fetch that was
                             killed resumes with what it had not finished
    current -> <revision>    what the runtime serves; switched by whoever restarts it (the model_store role flips
                             it atomically inside the drained restart), never by a fetch

A revision directory appears only by rename after verification: nothing ever reads a partial copy. Encrypted weights
(`deepfleet weights encrypt`) travel and rest as they are; their manifest covers the ciphertext files.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from deepfleet.security.manifest import MANIFEST_NAME, ManifestError, verify_manifest
from deepfleet.store.rclone import Rclone, RcloneError, RemoteFile, http_remote

CURRENT = "current"
_INCOMING = ".incoming-"
SPACE_MARGIN = 1.05  # filesystem metadata and rclone's temporary files
CACHE_PROBE_TIMEOUT_S = 5  # a site cache that is down costs the fetch this long before it goes to the origin


class FetchError(Exception):
    """The revision could not be fetched; the running revision was not touched."""


@dataclass
class FetchResult:
    revision: str
    path: str
    source: str  # "present" (already here), "cache" or "origin"
    bytes: int = 0
    pruned: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.source != "present" or bool(self.pruned)


def _check_revision(revision: str) -> None:
    if not revision or revision in (".", "..", CURRENT) or "/" in revision or revision.startswith("."):
        raise FetchError(f"revision {revision!r}: must be a plain name (no '/', not '{CURRENT}', not hidden)")


def _listing(rclone: Rclone, src: str) -> list[RemoteFile] | None:
    """The revision's files at src, or None when src has no manifest (revision absent there)."""
    files = rclone.list_files(src)
    return files if any(f.path == MANIFEST_NAME for f in files) else None


def _choose_source(rclone: Rclone, origin: str, cache: str | None, name: str, revision: str):
    """The site cache when it holds the revision, else the origin store."""
    if cache:
        src = http_remote(cache, f"{name}/{revision}")
        probe = dataclasses.replace(rclone, timeout_s=min(CACHE_PROBE_TIMEOUT_S, rclone.timeout_s))
        try:
            if (files := _listing(probe, src)) is not None:
                return "cache", src, files
        except RcloneError:
            pass  # cache down or revision not cached: the origin still serves
    src = f"{origin.rstrip('/')}/{revision}"
    try:
        files = _listing(rclone, src)
    except RcloneError as e:
        raise FetchError(f"origin {origin}: cannot list revision {revision}: {e}") from None
    if files is None:
        raise FetchError(f"revision {revision} not found: {src} has no {MANIFEST_NAME}")
    return "origin", src, files


def _check_space(dest: Path, incoming: Path, files: list[RemoteFile]) -> int:
    total = sum(f.size for f in files)
    have = sum(p.stat().st_size for p in incoming.rglob("*") if p.is_file()) if incoming.exists() else 0
    need = int((total - have) * SPACE_MARGIN)
    free = shutil.disk_usage(dest).free
    if need > free:
        raise FetchError(f"{dest}: {free / 2**30:.2f} GiB free, the revision needs {need / 2**30:.2f} GiB more "
                         f"({total} bytes in {len(files)} files)")
    return total


def _discard_bad_files(incoming: Path, problems: list[str]) -> None:
    """Delete the files a failed verification named, so the next fetch transfers them again."""
    for line in problems:
        rel = line.split(":", 1)[0]
        target = incoming / rel
        if rel and target.is_file() and incoming in target.resolve().parents:
            target.unlink()


def revisions(model_dir: Path) -> list[Path]:
    """Complete revisions, oldest first."""
    if not model_dir.is_dir():
        return []
    found = [p for p in model_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def prune(model_dir: Path, keep: int, wanted: str) -> list[str]:
    """Remove the oldest revisions until `keep` remain; never the wanted one (about to be served, maybe an old one
    switched back to) nor the one `current` points at (served until the restart)."""
    link = model_dir / CURRENT
    spared = {wanted, os.readlink(link) if link.is_symlink() else None}
    revs = revisions(model_dir)
    removable = [p for p in revs if p.name not in spared]
    excess = len(revs) - keep
    removed = []
    for old in removable[: max(0, excess)]:
        shutil.rmtree(old)
        removed.append(old.name)
    return removed


def _set_modes(root: Path, group: str | None) -> None:
    """root:group, files 0640, folders 0750 (the runtime's group reads, nobody else), before the rename."""
    if group is None:
        return
    gid = grp.getgrnam(group).gr_gid
    for path in [root, *root.rglob("*")]:
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, 0o750 if path.is_dir() else 0o640)


def fetch(rclone: Rclone, origin: str, model_dir: Path, revision: str, *, cache: str | None = None,
          keep: int = 2, group: str | None = None, log=print) -> FetchResult:
    """Bring `origin/<revision>` to `model_dir/<revision>` (through `cache` when it has it), verify, give it to
    `group` (root-owned, group-readable), prune."""
    _check_revision(revision)
    if keep < 1:
        raise FetchError(f"keep {keep}: at least 1 revision must be kept")
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise FetchError(f"group {group}: no such group on this host") from None
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / revision
    if final.is_dir():
        if not (final / MANIFEST_NAME).is_file():
            raise FetchError(f"{final} exists but holds no {MANIFEST_NAME}: not a fetched revision, remove it")
        return FetchResult(revision, str(final), "present", pruned=prune(model_dir, keep, revision))
    source, src, files = _choose_source(rclone, origin, cache, model_dir.name, revision)
    incoming = model_dir / f"{_INCOMING}{revision}"
    total = _check_space(model_dir, incoming, files)
    log(f"fetching {model_dir.name} {revision} from the {source} ({src}): {total} bytes in {len(files)} files")
    try:
        rclone.mirror(src, str(incoming))
    except RcloneError as e:
        raise FetchError(f"transfer of {src} interrupted (the next fetch resumes): {e}") from None
    try:
        verify_manifest(incoming)
    except ManifestError as e:
        _discard_bad_files(incoming, e.problems)
        raise FetchError(f"revision {revision} from the {source} failed verification, not installed: "
                         + "; ".join(e.problems)) from None
    _set_modes(incoming, group)
    os.rename(incoming, final)
    _fsync_dir(model_dir)
    log(f"verified and installed {final}")
    return FetchResult(revision, str(final), source, total, prune(model_dir, keep, revision))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
