"""SHA256 manifest of a model directory (`deepfleet-manifest.json`): size and digest of every file, so a changed,
missing or unexpected shard is named before its weights are loaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from deepfleet.security.files import map_files, regular_files

MANIFEST_NAME = "deepfleet-manifest.json"
MANIFEST_VERSION = 1
_READ_CHUNK = 8 << 20  # weight shards are GBs: hash them streaming


class ManifestError(Exception):
    """A model directory does not match its manifest; `problems` lists one line per file."""

    def __init__(self, model_dir: Path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{model_dir}: weights do not match {MANIFEST_NAME}: " + "; ".join(problems))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(model_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under model_dir except the manifest itself."""
    return [rel for p in regular_files(model_dir) if (rel := p.relative_to(model_dir).as_posix()) != MANIFEST_NAME]


def write_manifest(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a directory")
    rels = _model_files(model_dir)
    digests = map_files(sha256_file, [model_dir / rel for rel in rels])
    files = {
        rel: {"sha256": digest, "size": (model_dir / rel).stat().st_size}
        for rel, digest in zip(rels, digests, strict=True)
    }
    path = model_dir / MANIFEST_NAME
    path.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=2, sort_keys=True) + "\n")
    return path


def _read_manifest(model_dir: Path) -> dict[str, dict]:
    path = model_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("version") != MANIFEST_VERSION or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
            for e in files.values()
        ):
            raise ValueError(f"unsupported version or entry format (expected version {MANIFEST_VERSION})")
    except FileNotFoundError:
        raise ManifestError(model_dir, [f"{MANIFEST_NAME}: missing"]) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(model_dir, [f"{MANIFEST_NAME}: unreadable ({e})"]) from None
    return files


def verify_manifest(model_dir: str | Path) -> None:
    """Raise ManifestError naming every missing, unexpected, resized or changed file. Sizes are checked for all
    files before any hashing, so a wrong shard is reported without reading GBs first."""
    model_dir = Path(model_dir)
    expected = _read_manifest(model_dir)
    present = set(_model_files(model_dir))
    problems = [f"{rel}: missing" for rel in sorted(expected.keys() - present)]
    problems += [f"{rel}: unexpected (not in the manifest)" for rel in sorted(present - expected.keys())]
    to_hash = []
    for rel in sorted(expected.keys() & present):
        size = (model_dir / rel).stat().st_size
        if size != expected[rel]["size"]:
            problems.append(f"{rel}: size {size} != {expected[rel]['size']} in the manifest")
        else:
            to_hash.append(rel)
    if problems:
        raise ManifestError(model_dir, problems)
    digests = map_files(sha256_file, [model_dir / rel for rel in to_hash])
    for rel, digest in zip(to_hash, digests, strict=True):
        if digest != expected[rel]["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (file changed since the manifest was written)")
    if problems:
        raise ManifestError(model_dir, problems)
