"""AWS GPU capacity for one pool: cluster placement group, EFA security group and a launch template with one
EFA interface per EFA-capable network card (p4d.24xlarge: 4, p5.48xlarge: 32), IMDSv2 required, encrypted
EBS. The EKS managed node group (eks.py) launches from this template."""

from __future__ import annotations

import base64

import pulumi
import pulumi_aws as aws

from infra.config import GpuPool, Model, Storage
from infra.storage import warm_cache_block_device

# IMDSv2 only. Hop limit 1: pods cannot reach the node role's credentials (they get their own, if any).
IMDS_V2 = {"http_endpoint": "enabled", "http_tokens": "required", "http_put_response_hop_limit": 1}


def efa_interfaces(pool: GpuPool, security_group_ids: list[pulumi.Input[str]]) -> list[dict]:
    """One interface per network card. The first is the primary (device 0); the rest attach as device 1 on
    their own card, as AWS requires for multi-card EFA instances."""
    count = pool.spec.efa_interfaces if pool.efa else 1
    return [
        {
            "network_card_index": card,
            "device_index": 0 if card == 0 else 1,
            "interface_type": "efa" if pool.efa else "interface",
            "security_groups": security_group_ids,
            "delete_on_termination": "true",
        }
        for card in range(count)
    ]


def node_user_data() -> str:
    """AL2023 nodeadm config putting the instance-store NVMe in RAID0 under kubelet/containerd, so the pods'
    emptyDir (the warm weight cache) lives on NVMe. MIME multipart so EKS can merge its own part."""
    return "\n".join(
        [
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="DEEPFLEET"',
            "",
            "--DEEPFLEET",
            "Content-Type: application/node.eks.aws",
            "",
            "apiVersion: node.eks.aws/v1alpha1",
            "kind: NodeConfig",
            "spec:",
            "  instance:",
            "    localStorage:",
            "      strategy: RAID0",
            "",
            "--DEEPFLEET--",
            "",
        ]
    )


class GpuCapacity(pulumi.ComponentResource):
    """Placement group + launch template for one GPU pool."""

    def __init__(
        self,
        name: str,
        pool: GpuPool,
        storage: Storage,
        model: Model,
        vpc_id: pulumi.Input[str],
        cluster_security_group_id: pulumi.Input[str],
        kms_key_arn: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:aws:GpuCapacity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.placement_group = aws.ec2.PlacementGroup(f"{name}-pg", strategy="cluster", opts=child)
        security_groups: list[pulumi.Input[str]] = [cluster_security_group_id]
        if pool.efa:
            # EFA's OS-bypass traffic needs all traffic allowed to and from the group itself, and nothing else.
            self.efa_security_group = aws.ec2.SecurityGroup(
                f"{name}-efa",
                vpc_id=vpc_id,
                description=f"EFA: all traffic within {name}",
                ingress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "self": True}],
                egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "self": True}],
                opts=child,
            )
            security_groups.append(self.efa_security_group.id)
        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-lt",
            description=f"{pool.instance_type}: {pool.spec.gpus}x {pool.spec.gpu.name}, model {model.name}",
            instance_type=pool.instance_type,
            update_default_version=True,
            metadata_options=IMDS_V2,
            block_device_mappings=[warm_cache_block_device(storage, kms_key_arn)],
            network_interfaces=efa_interfaces(pool, security_groups),
            placement={"group_name": self.placement_group.name},
            user_data=base64.b64encode(node_user_data().encode()).decode(),
            tag_specifications=[{"resource_type": "instance", "tags": {"project": "deepfleet", "pool": pool.name}}],
            opts=child,
        )
        self.register_outputs({"launch_template_id": self.launch_template.id})
