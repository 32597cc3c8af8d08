"""`python -m infra.plan STACK` prints the resource tree without the Pulumi CLI."""

from __future__ import annotations

import subprocess
import sys

from infra import plan
from infra.config import ROOT
from infra.mocks import Capture


def test_tree_nests_resources_under_their_components(hybrid_stack: Capture) -> None:
    lines = plan.tree_lines(hybrid_stack)
    assert len(lines) == len(hybrid_stack.resources)
    i = lines.index("* deepfleet:aws:EksCluster  deepfleet")
    assert "    + aws:ec2/launchTemplate:LaunchTemplate  deepfleet-burst-lt" in lines[i:]
    assert "  * deepfleet:aws:GpuCapacity  deepfleet-burst" in lines[i:]
    assert "* deepfleet:hybrid:Router  deepfleet-router" in lines


def test_plan_command_runs_the_program_offline() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infra.plan", "onprem"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("stack onprem: ")
    assert "+ kubernetes:autoscaling/v2:HorizontalPodAutoscaler  deepfleet-hpa" in out.stdout
    assert "policies: all pass" in out.stdout


def test_plan_reports_a_bad_stack(capsys) -> None:
    assert plan.main(["nowhere"]) == 1
    assert "no stack file Pulumi.nowhere.yaml" in capsys.readouterr().err
    assert plan.main([]) == 2


def test_pulumi_entry_point_runs_like_the_language_host() -> None:
    """`pulumi up` executes the `main: infra/` directory with runpy.run_path(..., run_name="__main__")."""
    import json
    import runpy

    import pulumi

    from infra.config import NAMESPACE, read_stack_file
    from infra.mocks import RecordingMocks, RecordingMonitor

    recorded: list = []
    mocks = RecordingMocks()
    pulumi.runtime.set_mocks(
        mocks, project=NAMESPACE, stack="onprem", preview=False, monitor=RecordingMonitor(mocks, recorded)
    )
    pulumi.runtime.set_all_config({f"{NAMESPACE}:{k}": json.dumps(v) for k, v in read_stack_file("onprem").items()})
    pulumi.runtime.test(lambda: runpy.run_path(str(ROOT / "infra"), run_name="__main__"))()
    names = {(r.type, r.name) for r in recorded}
    assert ("kubernetes:apps/v1:Deployment", "deepfleet-deployment") in names
    assert ("deepfleet:onprem:Inventory", "deepfleet-onprem") in names
