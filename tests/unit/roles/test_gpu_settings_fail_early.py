"""playbooks/gpu.yml refuses wrong driver/CUDA settings before it changes anything, naming the variable:
run for real (check mode, local connection) against this machine declared as a GPU node."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from role_check import REPO, check_playbook


def run_gpu_playbook(tmp_path: Path, extra: dict) -> str:
    rc, out = check_playbook(tmp_path, REPO / "playbooks/gpu.yml", {"gpu_nodes": {"localhost": {}}},
                             "-e", json.dumps(extra))
    assert rc != 0, out
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=1", out), out
    return " ".join(out.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"nvidia_driver_branch": "570", "cuda_version": "13.0"},
         "cuda_version=13.0 needs a key of cuda_matrix (11.8, 12.2, 12.4, 12.8, 13.0) and a driver branch >= its "
         "min_driver (cuda_driver_branch/nvidia_driver_branch=570, needs 580)"),
        ({"nvidia_driver_branch": "550", "cuda_version": "12.8"}, "cuda_version=12.8 needs"),
        ({"cuda_version": "14.2"}, "cuda_version=14.2 needs a key of cuda_matrix"),
        ({"nvidia_driver_branch": "999"}, "value of nvidia_driver_branch must be one of: 470, 535, 550, 570, 575, 580"),
        ({"nvidia_driver_branch": "r580"}, "nvidia_driver_branch (cuda_driver_branch): 'r580' is not a driver branch"),
    ],
    ids=["cuda13-on-570", "cuda12.8-on-550", "unknown-cuda", "unknown-branch", "branch-not-a-number"],
)
def test_gpu_playbook_refuses_before_any_change(tmp_path, extra, message):
    assert message in run_gpu_playbook(tmp_path, extra)
