"""On-prem and edge: the stack config renders the Ansible inventory (hosts.yml + group_vars) and the RoCE fabric
plan, so `ansible-playbook` configures exactly what Pulumi declared. Variable names are the roles' own
(roles/*/defaults/main.yml). Rendering is pure; `OnpremInventory` exports the files as stack outputs and
`python -m infra.onprem STACK DIR` writes them to disk."""

from __future__ import annotations

import sys
from pathlib import Path, PurePosixPath

import pulumi
import yaml

from deepfleet.defaults import API_PORT
from infra import gpu_catalog
from infra.config import ConfigError, Model, ObjectStore, Onprem, StackConfig, parse, read_stack_file
from infra.runtime_settings import serve_settings

GPU_GROUP = "gpu_nodes"  # the group playbooks/gpu.yml and the nccl role target
# Jetson devices: playbooks/runtime.yml serves the small model there; playbooks/gpu.yml leaves their driver and
# CUDA to JetPack (the nvidia_driver and cuda roles refuse hosts of this group).
EDGE_GROUP = "edge"


def _model_vars(local_path: str) -> dict:
    path = PurePosixPath(local_path)
    return {
        "storage_tiers_hot_mount": str(path.parent),  # the hot tier holds the model directory
        "inference_runtime_model_name": path.name,
        "inference_runtime_model_dir": local_path,
        "inference_runtime_model_source": "present",  # staged by the storage tier, not copied by the role
    }


def _remote(name: str, store: ObjectStore) -> dict:
    vault = f"vault_model_store_{name}"
    return {
        "type": "s3",
        "provider": store.provider,
        "region": store.region,
        **({"endpoint": store.endpoint} if store.endpoint else {}),
        "access_key_id": f"{{{{ {vault}_access_key_id }}}}",
        "secret_access_key": f"{{{{ {vault}_secret_access_key }}}}",
    }


def _store_vars(model: Model, onprem: Onprem) -> dict:
    """The model from the object store (roles/model_store): revisions beside each other under local_path,
    <local_path>/current served; the mirror kept equal by a sync timer on the cache host (else the first host)."""
    store = onprem.model_store
    path = PurePosixPath(model.local_path)
    remotes = {"origin": _remote("origin", store.origin)}
    out = {
        "storage_tiers_hot_mount": str(path.parent),
        "inference_runtime_model_name": path.name,
        "inference_runtime_model_root": model.local_path,
        "inference_runtime_model_source": "objectstore",
        "model_store_origin": f"origin:{store.origin.bucket}/{model.s3_prefix}",
        "model_store_revision": store.revision,
        "model_store_cache_host": store.cache_host or "",
    }
    if store.mirror:
        remotes["mirror"] = _remote("mirror", store.mirror)
        out["model_store_sync_host"] = store.cache_host or onprem.hosts[0].name
        out["model_store_sync_jobs"] = [{"name": "origin-to-mirror", "src": f"origin:{store.origin.bucket}",
                                         "dst": f"mirror:{store.mirror.bucket}", "on_calendar": store.sync_on_calendar}]
    return {**out, "model_store_remotes": remotes}


class _IndentedDumper(yaml.SafeDumper):
    """Indents block sequences under their key, as yamllint's default config wants."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _dump(data: dict) -> str:
    return "---\n" + yaml.dump(data, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False)


def fabric_plan(onprem: Onprem) -> dict:
    """The RoCE fabric the hosts are configured for and the switches must match (PFC lossless class)."""
    f = onprem.fabric
    return {
        "transport": "RoCEv2",
        "lossless_class": {"dscp": f.dscp, "pfc_priority": f.pfc_priority, "ecn": True},
        "cnp_class": {"dscp": f.cnp_dscp, "priority": f.cnp_priority},
        "switch_requirements": [
            f"trust DSCP; map DSCP {f.dscp} to priority {f.pfc_priority}",
            f"PFC enabled on priority {f.pfc_priority} only (lossless); ECN marking on its queue (DCQCN)",
            f"map DSCP {f.cnp_dscp} (DCQCN CNPs) to priority {f.cnp_priority}, a strict-priority queue without PFC",
            f"MTU >= {f.mtu} on every RoCE port",
        ],
        "mtu": f.mtu,
        "targets": {"max_inter_node_latency_us": f.max_latency_us},
        "hosts": {
            h.name: {"address": h.address, "nics": [{"netdev": n.netdev, "hca": n.hca} for n in h.roce_nics]}
            for h in onprem.hosts
        },
    }


def render_inventory(cfg: StackConfig) -> dict[str, str]:
    """Relative path → file content: hosts.yml, group_vars/{all,gpu_nodes,edge}.yml, fabric-plan.yml."""
    if not cfg.onprem:
        raise ConfigError("deepfleet:onprem: required to render an inventory")
    onprem = cfg.onprem
    gpu_hosts = {
        h.name: {
            "ansible_host": h.address,
            "cuda_gpu_generations": [gpu_catalog.GPU_MODELS[h.gpu_model].generation],
            "rdma_roce_interfaces": [{"name": n.netdev} for n in h.roce_nics],
            "nccl_ib_hca": [n.hca for n in h.roce_nics],
        }
        for h in onprem.hosts
    }
    children: dict = {GPU_GROUP: {"hosts": gpu_hosts}}
    files: dict[str, str] = {}
    if cfg.edge:
        children[EDGE_GROUP] = {
            "hosts": {
                d.name: {
                    "ansible_host": d.address,
                    "cuda_gpu_generations": [gpu_catalog.EDGE_DEVICES[d.device].generation],
                }
                for d in cfg.edge.devices
            }
        }
        edge_path = str(PurePosixPath(cfg.model.local_path).parent / PurePosixPath(cfg.model.edge_name).name.lower())
        files["group_vars/edge.yml"] = _dump(
            {
                **_model_vars(edge_path),
                "inference_runtime_config": serve_settings(cfg.model, edge=True),
            }
        )
    files["hosts.yml"] = _dump({"all": {"vars": {"ansible_user": onprem.ssh_user}, "children": children}})
    files["group_vars/all.yml"] = _dump(
        {
            "deepfleet_api_port": API_PORT,
            "deepfleet_allowed_networks": list(cfg.networks.allowed),
            # The load balancers' client ports (roles/hardening): the role's default is the whole world.
            "hardening_client_networks": cfg.client_networks,
        }
    )
    f = onprem.fabric
    files[f"group_vars/{GPU_GROUP}.yml"] = _dump(
        {
            **(_store_vars(cfg.model, onprem) if onprem.model_store else _model_vars(cfg.model.local_path)),
            "nvidia_driver_gpu_required": True,  # Pulumi declared GPUs here: a host without them is an error
            "inference_runtime_config": serve_settings(cfg.model),
            "rdma_roce_dscp": f.dscp,
            "rdma_roce_priority": f.pfc_priority,
            "rdma_roce_mtu": f.mtu,
            "rdma_roce_cnp_dscp": f.cnp_dscp,
            "rdma_roce_cnp_priority": f.cnp_priority,
            "rdma_roce_validate_max_latency_us": f.max_latency_us,
            # perftest (rdma_roce validation) and NCCL (nccl_ib_gid_index follows it) use the same GID
            "rdma_roce_gid_index": f.gid_index,
        }
    )
    files["fabric-plan.yml"] = _dump(fabric_plan(onprem))
    return files


def write_inventory(cfg: StackConfig, directory: Path) -> list[Path]:
    written = []
    for rel, text in render_inventory(cfg).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


class OnpremInventory(pulumi.ComponentResource):
    """No cloud resources: the rendered files become stack outputs (`pulumi stack output inventory`)."""

    def __init__(self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("deepfleet:onprem:Inventory", name, None, opts)
        self.files = render_inventory(cfg)
        self.register_outputs({"files": self.files})


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m infra.onprem STACK DIR   (writes hosts.yml, group_vars/, fabric-plan.yml)")
        return 2
    try:
        cfg = parse(read_stack_file(argv[0]))
        for path in write_inventory(cfg, Path(argv[1])):
            print(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
