"""On-prem + edge: the stack config renders an inventory `ansible-inventory` accepts, with the roles' own
variable names, the RoCE fabric plan, the networks of the hardening role, and the edge group's small-model
profile."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepfleet.defaults import API_PORT
from infra import onprem
from infra.config import ROOT, ConfigError, parse, read_stack_file
from infra.mocks import Capture, run
from infra.runtime_settings import serve_settings

ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"
ROLE_PREFIXES = {
    "cuda_": "cuda",
    "rdma_roce_": "rdma_roce",
    "nccl_": "nccl",
    "inference_runtime_": "inference_runtime",
    "storage_tiers_": "storage_tiers",
    "nvidia_driver_": "nvidia_driver",
    "hardening_": "hardening",
    "model_store_": "model_store",
}


def _inventory(stack: str, tmp_path: Path) -> dict:
    onprem.write_inventory(parse(read_stack_file(stack)), tmp_path)
    out = subprocess.run(
        [str(ANSIBLE_INVENTORY), "-i", str(tmp_path / "hosts.yml"), "--list"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_ansible_inventory_accepts_the_rendered_inventory(tmp_path: Path) -> None:
    inv = _inventory("hybrid", tmp_path)
    assert inv["gpu_nodes"]["hosts"] == ["dgx-a100-01", "dgx-a100-02"]
    assert inv["edge"]["hosts"] == ["jetson-01"]
    dgx = inv["_meta"]["hostvars"]["dgx-a100-01"]
    assert dgx["ansible_host"] == "10.20.0.11" and dgx["ansible_user"] == "deepfleet"
    assert dgx["deepfleet_api_port"] == API_PORT
    assert dgx["deepfleet_allowed_networks"] == ["10.20.0.0/24", "10.30.0.0/24", "10.40.0.0/16"]
    assert dgx["cuda_gpu_generations"] == ["a100"]
    assert dgx["rdma_roce_interfaces"] == [{"name": "ens1f0np0"}, {"name": "ens1f1np1"}]
    assert dgx["nccl_ib_hca"] == ["mlx5_0", "mlx5_1"]
    assert (dgx["rdma_roce_dscp"], dgx["rdma_roce_priority"], dgx["rdma_roce_mtu"]) == (26, 3, 9000)
    assert dgx["rdma_roce_validate_max_latency_us"] == 50
    assert dgx["inference_runtime_model_dir"] == "/models/deepseek-r1-distill-qwen-32b"
    assert dgx["inference_runtime_config"]["queue_full_status"] == 503  # overflow spills to cloud via Envoy


def test_edge_group_gets_the_small_model_profile(tmp_path: Path) -> None:
    jetson = _inventory("onprem", tmp_path)["_meta"]["hostvars"]["jetson-02"]
    assert jetson["cuda_gpu_generations"] == ["orin"]
    assert "rdma_roce_interfaces" not in jetson and "nccl_ib_hca" not in jetson
    assert jetson["inference_runtime_model_name"] == "deepseek-r1-distill-qwen-1.5b"
    engine = jetson["inference_runtime_config"]["engine"]
    assert engine["dtype"] == "float16" and engine["max_num_seqs"] == 4 and engine["max_model_len"] == 4096


def _role_variables(role: str) -> set[str]:
    names = set(yaml.safe_load((ROOT / "roles" / role / "defaults/main.yml").read_text()) or {})
    specs = ROOT / "roles" / role / "meta/argument_specs.yml"
    if specs.exists():
        for entry in yaml.safe_load(specs.read_text())["argument_specs"].values():
            names |= set(entry.get("options", {}))
    return names


def test_rendered_variables_are_the_roles_own() -> None:
    files = onprem.render_inventory(parse(read_stack_file("hybrid")))
    rendered: set[str] = set()
    for rel, text in files.items():
        data = yaml.safe_load(text)
        if rel.startswith("group_vars/"):
            rendered |= set(data)
        elif rel == "hosts.yml":
            for group in data["all"]["children"].values():
                for host in group["hosts"].values():
                    rendered |= set(host)
    for name in sorted(rendered):
        role = next((r for p, r in ROLE_PREFIXES.items() if name.startswith(p)), None)
        if role:
            assert name in _role_variables(role), f"{name} is not a variable of role {role}"
        else:
            assert name in {"ansible_host", "deepfleet_api_port", "deepfleet_allowed_networks"}, name
    hardening = _role_variables("hardening")
    assert "deepfleet_allowed_networks" in hardening


def test_gpu_generations_are_known_to_the_cuda_role() -> None:
    spec = importlib.util.spec_from_file_location("cuda_arch", ROOT / "roles/cuda/filter_plugins/cuda_arch.py")
    cuda_arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_arch)
    from infra import gpu_catalog

    for model in [*gpu_catalog.GPU_MODELS.values(), *gpu_catalog.EDGE_DEVICES.values()]:
        assert model.generation in cuda_arch.GENERATION_ARCH, model.name


def test_fabric_plan_is_lossless_roce() -> None:
    plan = onprem.fabric_plan(parse(read_stack_file("onprem")).onprem)
    assert plan["lossless_class"] == {"dscp": 26, "pfc_priority": 3, "ecn": True}
    assert plan["cnp_class"] == {"dscp": 48, "priority": 6}
    assert "map DSCP 48 (DCQCN CNPs) to priority 6, a strict-priority queue without PFC" in plan["switch_requirements"]
    assert plan["targets"]["max_inter_node_latency_us"] == 50
    assert [n["hca"] for n in plan["hosts"]["dgx-a100-02"]["nics"]] == ["mlx5_0", "mlx5_1"]


def test_inventory_is_a_stack_output(onprem_stack: Capture) -> None:
    cfg = parse(read_stack_file("onprem"))
    assert onprem_stack.outputs["inventory"] == onprem.render_inventory(cfg)
    assert onprem_stack.outputs["fabric_plan"] == onprem.fabric_plan(cfg.onprem)


def test_cli_writes_the_files_and_rejects_a_stack_without_onprem(tmp_path: Path, capsys) -> None:
    assert onprem.main(["onprem", str(tmp_path)]) == 0
    assert (tmp_path / "hosts.yml").is_file() and (tmp_path / "group_vars/gpu_nodes.yml").is_file()
    assert onprem.main(["aws", str(tmp_path / "x")]) == 1
    assert "deepfleet:onprem: required to render an inventory" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        onprem.render_inventory(parse(read_stack_file("aws")))


def _onprem(edit) -> dict:
    raw = copy.deepcopy(read_stack_file("onprem"))
    edit(raw)
    return raw


def _rendered(capture: Capture, rel: str) -> dict:
    return yaml.safe_load(capture.outputs["inventory"][rel])


def test_client_networks_are_rendered_from_the_stack_config() -> None:
    clients = ["10.20.0.0/24", "172.16.8.0/22"]
    capture = run("onprem", _onprem(lambda r: r["networks"].update(clients=clients)))
    rendered = _rendered(capture, "group_vars/all.yml")
    assert rendered["hardening_client_networks"] == clients
    assert rendered["deepfleet_allowed_networks"] == ["10.20.0.0/24", "10.30.0.0/24", "192.168.10.0/24"]


def test_client_networks_default_to_the_declared_networks_never_the_world(onprem_stack: Capture) -> None:
    # The hardening role's own default is ["0.0.0.0/0", "::/0"]: a stack without networks.clients must not get it.
    rendered = _rendered(onprem_stack, "group_vars/all.yml")
    # networks.allowed, then onprem.network_cidr and edge.network_cidr (already in allowed: listed once).
    assert rendered["hardening_client_networks"] == ["10.20.0.0/24", "10.30.0.0/24", "192.168.10.0/24"]
    hybrid = parse(read_stack_file("hybrid"))
    assert hybrid.client_networks == ["10.20.0.0/24", "10.30.0.0/24", "10.40.0.0/16"]
    without_edge = parse(_onprem(lambda r: (r.pop("edge"), r["networks"].update(allowed=["192.168.10.0/24"]))))
    assert without_edge.client_networks == ["192.168.10.0/24", "10.20.0.0/24"]


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        (["10.20.0.0/24", "10.0.0.300/24"], "deepfleet:networks.clients[1]: not an IPv4 CIDR network"),
        (["10.20.0.5/24"], "deepfleet:networks.clients[0]: not an IPv4 CIDR network: 10.20.0.5/24 has host bits"),
        ([], "deepfleet:networks.clients: List should have at least 1 item"),
        ("10.0.0.0/8", "deepfleet:networks.clients: Input should be a valid list"),
    ],
)
def test_bad_client_network_fails_naming_the_key(clients, message: str) -> None:
    capture = Capture("bad")
    with pytest.raises(ConfigError) as err:
        run("onprem", _onprem(lambda r: r["networks"].update(clients=clients)), capture)
    assert message in str(err.value)
    assert capture.resources == []  # stopped in config validation, nothing registered


def test_edge_group_carries_the_devices_and_the_small_model() -> None:
    raw = _onprem(lambda r: r["model"].update(edge_max_model_len=2048))
    capture = run("onprem", raw)
    cfg = parse(raw)
    hosts = _rendered(capture, "hosts.yml")["all"]["children"]
    assert {name: h["ansible_host"] for name, h in hosts[onprem.EDGE_GROUP]["hosts"].items()} == {
        d.name: d.address for d in cfg.edge.devices
    }
    assert not set(hosts[onprem.EDGE_GROUP]["hosts"]) & set(hosts[onprem.GPU_GROUP]["hosts"])
    edge = _rendered(capture, f"group_vars/{onprem.EDGE_GROUP}.yml")
    assert edge["inference_runtime_config"] == serve_settings(cfg.model, edge=True)  # one definition, reused
    assert edge["inference_runtime_config"]["engine"]["max_model_len"] == 2048
    assert edge["inference_runtime_config"]["served_model_name"] == cfg.model.edge_name
    assert edge["inference_runtime_model_dir"] == "/models/deepseek-r1-distill-qwen-1.5b"
    gpu = _rendered(capture, f"group_vars/{onprem.GPU_GROUP}.yml")
    assert gpu["inference_runtime_config"]["served_model_name"] == cfg.model.name
    assert "max_model_len" not in gpu["inference_runtime_config"]["engine"]


def test_fabric_defaults_are_the_rdma_roce_roles() -> None:
    """Written down from roles/rdma_roce/defaults/main.yml's documented class (26 -> 3 lossless, CNPs 48 -> 6,
    GID 3, MTU 9000, 50 us): a stack that sets no fabric renders exactly what the role would do alone."""
    from infra.config import RoceFabric

    f = RoceFabric()
    assert (f.dscp, f.pfc_priority, f.cnp_dscp, f.cnp_priority, f.gid_index, f.mtu, f.max_latency_us) == (
        26, 3, 48, 6, 3, 9000, 50)
    role = yaml.safe_load((ROOT / "roles/rdma_roce/defaults/main.yml").read_text())
    assert (role["rdma_roce_dscp"], role["rdma_roce_priority"], role["rdma_roce_cnp_dscp"],
            role["rdma_roce_cnp_priority"], role["rdma_roce_gid_index"], role["rdma_roce_mtu"],
            role["rdma_roce_validate_max_latency_us"]) == (26, 3, 48, 6, 3, 9000, 50)


def test_gid_index_reaches_perftest_and_nccl_alike() -> None:
    files = onprem.render_inventory(parse(read_stack_file("onprem")))
    gpu_vars = yaml.safe_load(files["group_vars/gpu_nodes.yml"])
    assert gpu_vars["rdma_roce_gid_index"] == 3 and "nccl_ib_gid_index" not in gpu_vars  # nccl follows the role var
    nccl = yaml.safe_load((ROOT / "roles/nccl/defaults/main.yml").read_text())
    assert nccl["nccl_ib_gid_index"] == "{{ rdma_roce_gid_index }}"


@pytest.mark.parametrize(("fabric", "named"), [({"cnp_dscp": 26}, "cnp_dscp"), ({"cnp_priority": 3}, "cnp_priority")])
def test_cnp_class_must_differ_from_the_lossless_class(fabric, named) -> None:
    from infra.config import RoceFabric

    with pytest.raises(ValueError, match=named):
        RoceFabric(**fabric)


def test_model_store_renders_the_roles_variables_with_vault_credentials() -> None:
    files = onprem.render_inventory(parse(read_stack_file("onprem")))
    gpu = yaml.safe_load(files[f"group_vars/{onprem.GPU_GROUP}.yml"])
    assert gpu["inference_runtime_model_source"] == "objectstore"
    assert gpu["inference_runtime_model_root"] == "/models/deepseek-r1-distill-qwen-32b"  # model.local_path
    assert "inference_runtime_model_dir" not in gpu  # the role derives <root>/current
    assert gpu["model_store_origin"] == "origin:deepfleet-models/models/deepseek-r1-distill-qwen-32b"
    assert gpu["model_store_revision"] == "2025-01-20"
    assert gpu["model_store_cache_host"] == gpu["model_store_sync_host"] == "dgx-a100-01"
    assert gpu["model_store_remotes"]["origin"] == {
        "type": "s3", "provider": "Ceph", "region": "us-east-1", "endpoint": "https://s3.dc.example",
        "access_key_id": "{{ vault_model_store_origin_access_key_id }}",
        "secret_access_key": "{{ vault_model_store_origin_secret_access_key }}",
    }
    mirror = gpu["model_store_remotes"]["mirror"]
    assert mirror["secret_access_key"] == "{{ vault_model_store_mirror_secret_access_key }}"
    assert gpu["model_store_sync_jobs"] == [{"name": "origin-to-mirror", "src": "origin:deepfleet-models",
                                             "dst": "mirror:deepfleet-models-eu-west-1", "on_calendar": "hourly"}]


def test_model_store_cache_host_must_be_an_onprem_host() -> None:
    raw = _onprem(lambda r: r["onprem"]["model_store"].update(cache_host="dgx-h100-99"))
    with pytest.raises(ConfigError, match=r"model_store.cache_host: dgx-h100-99 is not one of hosts\[\].name"):
        parse(raw)
