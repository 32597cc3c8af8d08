"""Child process of the kernel tests: runs the Triton kernels on CPU tensors under Triton's interpreter.

`python tests/unit/kernels/interpreted.py CASES OUT` loads a list of keyword dicts for
deepfleet.kernels.paged_attention.paged_attention (torch.save format), runs each and saves the outputs to OUT.

Why a separate process: Triton decides interpreter-or-compiler when `triton.jit` decorates a function, its own
library functions (tl.zeros, …) included, so TRITON_INTERPRET must be set before triton is first imported. The
pytest process imports triton early (the root conftest imports torch._dynamo, which imports triton), and setting
the variable there would also reach every process other tests start. Here it is set before anything is imported."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from deepfleet.kernels.paged_attention import paged_attention  # noqa: E402

_patch_tensor = interpreter._patch_lang_tensor


def _patch_tensor_index(tensor, scope):
    """Triton 3.6's interpreter turns a scalar into an int with int() of a 1-element array, which numpy >= 2.4
    refuses ("only 0-dimensional arrays…"); kernels whose loop bounds are device values need it. Same result."""
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_tensor_index

if __name__ == "__main__":
    cases = torch.load(sys.argv[1])
    torch.save([paged_attention(**case) for case in cases], sys.argv[2])
