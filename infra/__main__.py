"""The deepfleet Pulumi program: read the typed stack config, compose the components, export the outputs.
`pulumi up` runs this file; tests and `python -m infra.plan` call `main()` under Pulumi's mocks."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import config
from infra.eks import EksCluster
from infra.gpu_catalog import ACCELERATOR_LABEL
from infra.hybrid_routing import HybridRouter
from infra.k8s_security import scrape_endpoint
from infra.k8s_workload import APP, LABELS, FsxVolume, InferenceWorkload
from infra.monitoring import Monitoring
from infra.network import Network
from infra.onprem import OnpremInventory, fabric_plan
from infra.onprem_gpu import OnpremGpuStack
from infra.storage import StorageTiers


def main() -> dict:
    cfg = config.from_pulumi()  # raises ConfigError before anything is registered
    outputs: dict = {}
    provider: k8s.Provider | None = None
    fsx: FsxVolume | None = None
    node_label: tuple[str, str] | None = None
    efa_interfaces = 0
    if cfg.aws and cfg.storage:
        opts = pulumi.ResourceOptions(providers=[aws.Provider("aws", region=cfg.aws.region)])
        net = Network("deepfleet", cfg.aws, opts)
        # FSx sits in the AZ of the first GPU pool, next to its cluster placement group.
        fsx_subnet = net.private_subnets[cfg.aws.gpu_pools[0].availability_zone]
        storage = StorageTiers("deepfleet", cfg.storage, cfg.model, net.vpc.id, cfg.aws.vpc_cidr, fsx_subnet.id, opts)
        eks = EksCluster(
            "deepfleet",
            cfg.aws,
            cfg.storage,
            cfg.model,
            cfg.networks,
            net.vpc.id,
            net.private_subnets,
            storage.kms_key.arn,
            cfg.autoscaling.scale_down_cooldown_s,
            opts,
        )
        provider, node_label = eks.provider, (ACCELERATOR_LABEL, "nvidia")
        # Pods land on any GPU pool: they take EFA devices only when every pool has them (as many as the
        # smallest pool's interface count), else a pod could never schedule on the pools without.
        pools = cfg.aws.gpu_pools
        efa_interfaces = min(p.spec.efa_interfaces for p in pools) if all(p.efa for p in pools) else 0
        fsx = FsxVolume(storage.weight_flow, cfg.storage.fsx.storage_capacity_gib)
        flow = storage.weight_flow
        outputs |= {
            "vpc_id": net.vpc.id,
            "cluster_name": eks.cluster.name,
            "kubeconfig": eks.kubeconfig,
            "model_bucket": storage.model_bucket.bucket,
            "archive_bucket": storage.archive_bucket.bucket,
            "model_weight_flow": {
                "s3": flow.s3_uri,
                "fsx": pulumi.Output.concat(flow.fsx_dns_name, ":", flow.fsx_path),
                "nvme": flow.nvme_path,
            },
        }
    elif cfg.workload:
        provider = k8s.Provider("deepfleet-k8s", context=cfg.workload.kubeconfig_context)
        OnpremGpuStack("deepfleet-gpu", cfg.workload.gpu_stack, cfg.workload.mig_strategy, provider)
    if cfg.workload and provider:
        workload = InferenceWorkload(
            "deepfleet",
            cfg.workload,
            cfg.autoscaling,
            cfg.model,
            cfg.networks,
            provider,
            fsx=fsx,
            node_label=node_label,
            efa_interfaces=efa_interfaces,
        )
        Monitoring(
            "deepfleet-monitoring",
            cfg.workload.namespace,
            LABELS,
            provider,
            scrape_endpoint=scrape_endpoint(cfg.workload.security, f"{APP}.{cfg.workload.namespace}.svc"),
            opts=pulumi.ResourceOptions(depends_on=[workload]),
        )
        outputs["service"] = f"{APP}.{cfg.workload.namespace}.svc.cluster.local"
    if cfg.onprem:
        outputs["inventory"] = OnpremInventory("deepfleet-onprem", cfg).files
        outputs["fabric_plan"] = fabric_plan(cfg.onprem)
    if cfg.routing and cfg.workload and provider:
        cloud = outputs["service"] if cfg.aws else None
        router = HybridRouter("deepfleet-router", cfg, cfg.workload.namespace, cloud, provider)
        outputs["envoy_config"] = router.config_yaml
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs


if __name__ == "__main__":
    main()
