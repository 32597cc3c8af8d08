"""Repository-wide test wiring: GPU tests skip without a GPU; the compliance suite only runs when a
target inventory is given (`--hosts=...`), because testinfra would otherwise check this very machine."""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET
# when triton.language is first imported (torch._dynamo below imports it), so it is set here, before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ansible-core replaces sys.intern with a patch object when imported (the role tests import it); torch's dynamo
# registers a polyfill for sys.intern when it is first imported and refuses a non-function. Importing dynamo
# first keeps both working in one pytest process.
import torch._dynamo  # noqa: F401,E402  isort: skip

COMPLIANCE_DIR = Path(__file__).parent / "compliance"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("compliance", "compliance suite (tests/compliance)")
    group.addoption("--inventory-host", default=None,
                    help="with a local:// or ssh:// target and --ansible-inventory: the inventory host whose "
                         "variables apply (default: the ssh target's name, or this machine's host name)")
    group.addoption("--require-gpu", action="store_true", default=False,
                    help="GPU checks fail instead of skipping on a host without an NVIDIA GPU")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    if COMPLIANCE_DIR in (collection_path, *collection_path.parents) and not config.getoption("hosts", None):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def interpreter_scalar_index(monkeypatch):
    """Triton 3.6's interpreter turns a scalar into an int with int() of a 1-element array, which numpy >= 2.4
    refuses ("only 0-dimensional arrays…"); the paged-attention kernel's loop bounds are device values and need
    it. Same value. Used by the tests that run that kernel under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
