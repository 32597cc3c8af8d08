"""Static checks of runtime/Dockerfile (`make image` builds it with buildah, `make image-test` serves from it;
both outside `make test`): CUDA base by default, non-root user, a healthcheck, the exposed port equal to
deepfleet.defaults.API_PORT, an offline build from wheels/, and one name for the image."""

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
    assert copied == ["wheels /wheels", "pyproject.toml README.md /src/", "deepfleet /src/deepfleet"]
    assert (RUNTIME / "pyproject.toml").is_file() and (RUNTIME / "deepfleet").is_dir()
    # wheels/ exists (empty, ignored) so a plain `docker build runtime/` works as well as make image's context
    assert (RUNTIME / "wheels" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]


def test_offline_build_switches():
    assert "ARG PIP_NO_INDEX=0" in DOCKERFILE and "PIP_FIND_LINKS=/wheels PIP_NO_INDEX=${PIP_NO_INDEX}" in DOCKERFILE
    assert "ARG EXTRAS=onnx,gpu" in DOCKERFILE and 'pip install "/src${EXTRAS:+[$EXTRAS]}"' in DOCKERFILE
    script = (RUNTIME.parent / "scripts" / "build-image.sh").read_text()
    assert "--build-arg PIP_NO_INDEX=1" in script and "-f runtime/Dockerfile" in script


def test_one_name_for_the_image_in_the_build_and_the_stacks():
    import deepfleet
    from deepfleet.defaults import IMAGE_REPOSITORY
    from infra.config import parse, read_stack_file

    for script in ("build-image.sh", "image-serve-test.sh"):
        text = (RUNTIME.parent / "scripts" / script).read_text()
        assert 'IMAGE=localhost/$("$PY" -c \'import deepfleet, deepfleet.defaults as d; ' \
               'print(f"{d.IMAGE_REPOSITORY}:{deepfleet.__version__}")\')' in text, script
    images = {stack: parse(read_stack_file(stack)).workload.image for stack in ("aws", "hybrid", "onprem")}
    assert images == {"aws": f"ghcr.io/{IMAGE_REPOSITORY}:{deepfleet.__version__}",
                      "hybrid": f"ghcr.io/{IMAGE_REPOSITORY}:{deepfleet.__version__}",
                      "onprem": f"registry.dc.example/{IMAGE_REPOSITORY}:{deepfleet.__version__}"}
    assert images["aws"] == "ghcr.io/deepfleet/runtime:0.1.0"  # written down: the name pushed and pulled
