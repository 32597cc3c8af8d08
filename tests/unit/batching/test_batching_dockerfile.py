"""Static checks of runtime/Dockerfile (no Docker engine on the build machines, so it is never built here):
CUDA base, non-root user, a healthcheck, and the exposed port equal to deepfleet.defaults.API_PORT."""

import re
from pathlib import Path

from deepfleet.defaults import API_PORT

RUNTIME = Path(__file__).parents[3] / "runtime"
DOCKERFILE = (RUNTIME / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(name + " ")]


def test_cuda_base_and_final_stage_runs_as_non_root():
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\d.]+-(base|runtime)-ubuntu22\.04$", DOCKERFILE, re.M)
    users = _instructions("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert DOCKERFILE.rindex("USER ") > DOCKERFILE.rindex("FROM ")


def test_healthcheck_and_port_match_the_runtime_defaults():
    assert _instructions("EXPOSE") == [str(API_PORT)]
    assert _instructions("HEALTHCHECK")
    assert f"http://127.0.0.1:{API_PORT}/healthz" in DOCKERFILE
    assert _instructions("ENTRYPOINT") == ['["deepfleet"]']


def test_copies_only_what_the_runtime_package_needs():
    copied = [c for c in _instructions("COPY") if not c.startswith("--from")]
    assert copied == ["pyproject.toml README.md /src/", "deepfleet /src/deepfleet"]
    assert (RUNTIME / "pyproject.toml").is_file() and (RUNTIME / "deepfleet").is_dir()
