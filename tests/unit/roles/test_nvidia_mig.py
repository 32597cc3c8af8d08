"""roles/nvidia_mig without a GPU: the layout check (filter plugin) on written-down H100/H200/A30/L40S cases,
the role's own tasks run for real in check mode with the GPUs given as detected PCI ids (a bad profile fails
before any change, naming the entry, the GPU model and the profile), and the rendered nvidia-mig-parted file."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from role_check import check_role

REPO = Path(__file__).resolve().parents[3]
ROLE = REPO / "roles" / "nvidia_mig"
BIN = Path(sys.executable).parent
H200, H100, A30, L40S = "0x2335", "0x2330", "0x20b7", "0x26b9"  # PCI device ids (L40S: no MIG)

_spec = importlib.util.spec_from_file_location("mig_layout", ROLE / "filter_plugins" / "mig_layout.py")
mig_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mig_layout)
GPUS = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["nvidia_mig_gpus"]


def problems(layout, ids):
    return mig_layout.mig_layout_problems(layout, ids, GPUS)


@pytest.mark.parametrize(("ids", "layout"), [
    ([H200] * 8, [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.18gb": 7}}]),
    ([H200] * 2, [{"devices": "all", "mig-enabled": True, "mig-devices": {"3g.71gb": 2}}]),
    ([H100] * 2, [{"devices": [0], "mig-enabled": True, "mig-devices": {"4g.40gb": 1, "2g.20gb": 1, "1g.10gb": 1}},
                  {"devices": [1], "mig-enabled": False}]),
    ([A30], [{"devices": "all", "mig-enabled": True, "mig-devices": {"2g.12gb": 2}}]),
    ([L40S], [{"devices": "all", "mig-enabled": False}]),
    ([H200], []),
])
def test_layouts_the_gpus_can_hold(ids, layout):
    assert problems(layout, ids) == []


def test_a_profile_the_gpu_does_not_offer_is_named_with_the_gpu():
    # 1g.10gb is an 80 GB part's profile: the H200's smallest is 1g.18gb
    out = problems([{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.10gb": 7}}], [H200, H200])
    assert out[0] == ("nvidia_mig_layout[0].mig-devices: H200-SXM-141GB (GPU 0) offers no profile 1g.10gb (it "
                      "offers: 1g.18gb, 1g.18gb+me, 1g.35gb, 2g.35gb, 3g.71gb, 4g.71gb, 7g.141gb)")
    assert len(out) == 2 and out[1].startswith("nvidia_mig_layout[0].mig-devices: H200-SXM-141GB (GPU 1)")


@pytest.mark.parametrize(("ids", "wanted", "message"), [
    ([H200], {"1g.35gb": 5}, "nvidia_mig_layout[0].mig-devices.1g.35gb: 5 instances, H200-SXM-141GB holds at most 4"),
    ([H200], {"3g.71gb": 2, "1g.18gb": 2}, "nvidia_mig_layout[0].mig-devices: 8 compute slices on GPU 0, "
                                           "H200-SXM-141GB has 7"),
    ([H100], {"4g.40gb": 1, "3g.40gb": 1, "1g.10gb": 0}, "nvidia_mig_layout[0].mig-devices.1g.10gb: 0 is not a "
                                                          "count >= 1"),
    ([A30], {"4g.24gb": 1, "1g.6gb": 1}, "nvidia_mig_layout[0].mig-devices: 5 compute slices on GPU 0, A30-24GB has 4"),
    ([L40S], {"1g.10gb": 1}, "nvidia_mig_layout[0]: GPU 0 (PCI device 0x26b9) does not support MIG"),
])
def test_layouts_that_do_not_fit(ids, wanted, message):
    assert message in problems([{"devices": "all", "mig-enabled": True, "mig-devices": wanted}], ids)


def test_entry_shape_errors_name_the_key():
    out = problems([{"devices": [0, 3], "mig-enabled": "yes"}, {"devices": [2], "mig-enabled": True, "migdevices": {}}],
                   [H200, H200])
    assert "nvidia_mig_layout[0].mig-enabled: 'yes' is not true or false" in out
    assert "nvidia_mig_layout[1]: unknown key(s) ['migdevices'] (known: ['devices', 'mig-devices', " \
           "'mig-enabled'])" in out
    assert "nvidia_mig_layout[1].devices: GPU index [2] not on this host (2 GPU(s): 0..1)" in out


def test_a_later_entry_overrides_an_earlier_one_for_its_gpus():
    layout = [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.10gb": 7}},
              {"devices": [1], "mig-enabled": False}]
    assert problems(layout, [H100, L40S]) == []  # GPU 1 (no MIG) is left whole by the second entry


def _play(tmp_path: Path, tasks_from: str, extra: dict) -> tuple[int, str]:
    return check_role(tmp_path, "nvidia_mig", extra, tasks_from)


def test_role_refuses_a_profile_the_gpu_lacks_before_any_change(tmp_path):
    rc, out = _play(tmp_path, "main", {
        "nvidia_driver_gpu_device_ids": [H200], "nvidia_driver_gpu_count": 1,
        "nvidia_mig_layout": [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.10gb": 7}}]})
    assert rc != 0
    assert "localhost: nvidia_mig_layout[0].mig-devices: H200-SXM-141GB (GPU 0) offers no profile 1g.10gb" in out
    assert re.search(r"localhost : ok=\d+ changed=0 unreachable=0 failed=1", out), out


def test_role_accepts_a_layout_that_fits(tmp_path):
    rc, out = _play(tmp_path, "validate", {
        "nvidia_driver_gpu_device_ids": [H200, H200], "nvidia_driver_gpu_count": 2,
        "nvidia_mig_layout": [{"devices": "all", "mig-enabled": True, "mig-devices": {"3g.71gb": 1, "2g.35gb": 2}}]})
    assert rc == 0, out
    assert re.search(r"localhost : ok=\d+ changed=0 unreachable=0 failed=0", out), out


def test_without_a_layout_the_role_leaves_mig_alone(tmp_path):
    rc, out = _play(tmp_path, "main", {"nvidia_driver_gpu_device_ids": [H200], "nvidia_driver_gpu_count": 1})
    assert rc == 0, out
    assert "localhost: no nvidia_mig_layout declared: MIG left as it is" in out
    assert re.search(r"localhost : ok=\d+ changed=0 unreachable=0 failed=0", out), out


def test_rendered_config_is_mig_parted_format(tmp_path):
    layout = [{"devices": [0, 1], "mig-enabled": True, "mig-devices": {"1g.18gb": 7}}]
    play = [{"name": "render", "hosts": "localhost", "gather_facts": False,
             "vars": yaml.safe_load((ROLE / "defaults" / "main.yml").read_text()) | {"nvidia_mig_layout": layout},
             "tasks": [{"ansible.builtin.template": {"src": str(ROLE / "templates" / "mig-config.yaml.j2"),
                                                     "dest": str(tmp_path / "out.yaml"), "mode": "0644"}}]}]
    (tmp_path / "render.yml").write_text(yaml.safe_dump(play))
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", PATH=f"{BIN}:{os.environ['PATH']}")
    res = subprocess.run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                          "-e", f"ansible_python_interpreter={sys.executable}", str(tmp_path / "render.yml")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    rendered = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert rendered == {"version": "v1", "mig-configs": {"deepfleet": layout}}
