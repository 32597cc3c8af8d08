"""EKS: the cluster (private + allow-listed public endpoint, KMS-encrypted secrets, audit logs), a system node
group, one GPU node group per pool (NVIDIA AMI, GPU taint, labels, EFA launch template from gpu_capacity),
the device plugins (NVIDIA GPU, EFA) plus the FSx CSI driver as Helm releases, and the node autoscaler
(node_autoscaler: cluster-autoscaler over the GPU node groups)."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra import helm
from infra.config import Aws, Model, Networks, Storage
from infra.gpu_capacity import IMDS_V2, GpuCapacity
from infra.gpu_catalog import ACCELERATOR_LABEL, GPU_RESOURCE, GPU_TOLERATION, device_plugin_config
from infra.node_autoscaler import SYSTEM_NODES, NodeAutoscaler
from infra.storage import ROOT_DEVICE

GPU_TAINT = {"key": GPU_RESOURCE, "value": "true", "effect": "NO_SCHEDULE"}
EFA_LABEL = "deepfleet.io/efa"
POOL_LABEL = "deepfleet.io/pool"

# eks-pod-identity-agent: IAM roles for pods (the node autoscaler's) without an OIDC provider.
ADDONS = ("vpc-cni", "coredns", "kube-proxy", "eks-pod-identity-agent")
# The VPC CNI enforces NetworkPolicy only with its network-policy agent on (the workload's NetworkPolicy is
# otherwise accepted and ignored).
ADDON_CONFIG = {"vpc-cni": json.dumps({"enableNetworkPolicy": "true"})}

# Least privilege: nodes get only what kubelet, the VPC CNI and image pulls need; pods read weights through
# FSx (no S3 permissions anywhere on the node).
NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly")
CLUSTER_POLICIES = ("AmazonEKSClusterPolicy",)


def _role(name: str, service: str, policies: tuple[str, ...], parent: pulumi.Resource) -> aws.iam.Role:
    role = aws.iam.Role(
        name,
        assume_role_policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}],
            }
        ),
        opts=pulumi.ResourceOptions(parent=parent),
    )
    for policy in policies:
        aws.iam.RolePolicyAttachment(
            f"{name}-{policy}",
            role=role.name,
            policy_arn=f"arn:aws:iam::aws:policy/{policy}",
            opts=pulumi.ResourceOptions(parent=role),
        )
    return role


def kubeconfig(cluster: aws.eks.Cluster, region: str) -> pulumi.Output[str]:
    """A kubeconfig that authenticates with `aws eks get-token` (no static credentials stored)."""
    return pulumi.Output.all(cluster.name, cluster.endpoint, cluster.certificate_authority.data).apply(
        lambda a: json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": a[0],
                "clusters": [{"name": a[0], "cluster": {"server": a[1], "certificate-authority-data": a[2]}}],
                "contexts": [{"name": a[0], "context": {"cluster": a[0], "user": a[0]}}],
                "users": [
                    {
                        "name": a[0],
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "command": "aws",
                                "args": ["eks", "get-token", "--cluster-name", a[0], "--region", region],
                            }
                        },
                    }
                ],
            }
        )
    )


class EksCluster(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        cfg: Aws,
        storage: Storage,
        model: Model,
        networks: Networks,
        vpc_id: pulumi.Input[str],
        private_subnets: dict[str, aws.ec2.Subnet],
        kms_key_arn: pulumi.Input[str],
        scale_down_unneeded_s: int,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:aws:EksCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        cluster_role = _role(f"{name}-cluster-role", "eks.amazonaws.com", CLUSTER_POLICIES, self)
        node_role = _role(f"{name}-node-role", "ec2.amazonaws.com", NODE_POLICIES, self)
        self.cluster = aws.eks.Cluster(
            name,
            version=cfg.kubernetes_version,
            role_arn=cluster_role.arn,
            vpc_config={
                "subnet_ids": [s.id for s in private_subnets.values()],
                "endpoint_private_access": True,
                # The public endpoint answers only the allowed networks (never 0.0.0.0/0).
                "endpoint_public_access": True,
                "public_access_cidrs": list(networks.allowed),
            },
            encryption_config={"resources": ["secrets"], "provider": {"key_arn": kms_key_arn}},
            enabled_cluster_log_types=["api", "audit", "authenticator"],
            access_config={"authentication_mode": "API", "bootstrap_cluster_creator_admin_permissions": True},
            opts=child,
        )
        cluster_sg = self.cluster.vpc_config.cluster_security_group_id
        for addon in ADDONS:
            aws.eks.Addon(
                f"{name}-{addon}",
                cluster_name=self.cluster.name,
                addon_name=addon,
                configuration_values=ADDON_CONFIG.get(addon),
                opts=child,
            )

        system_lt = aws.ec2.LaunchTemplate(
            f"{name}-system-lt",
            metadata_options=IMDS_V2,
            block_device_mappings=[
                {
                    "device_name": ROOT_DEVICE,
                    "ebs": {
                        "volume_type": "gp3",
                        "volume_size": 50,
                        "encrypted": "true",
                        "kms_key_id": kms_key_arn,
                        "delete_on_termination": "true",
                    },
                }
            ],
            opts=child,
        )
        system = aws.eks.NodeGroup(
            f"{name}-system",
            cluster_name=self.cluster.name,
            node_role_arn=node_role.arn,
            subnet_ids=[s.id for s in private_subnets.values()],
            instance_types=[cfg.system_pool.instance_type],
            ami_type="AL2023_x86_64_STANDARD",
            launch_template={"id": system_lt.id, "version": system_lt.latest_version.apply(str)},
            scaling_config=_scaling(cfg.system_pool),
            labels=SYSTEM_NODES,
            opts=child,
        )
        self.gpu_node_groups: dict[str, aws.eks.NodeGroup] = {}
        for pool in cfg.gpu_pools:
            capacity = GpuCapacity(
                f"{name}-{pool.name}", pool, storage, model, vpc_id, cluster_sg, kms_key_arn, opts=child
            )
            lt = capacity.launch_template
            self.gpu_node_groups[pool.name] = aws.eks.NodeGroup(
                f"{name}-{pool.name}",
                cluster_name=self.cluster.name,
                node_role_arn=node_role.arn,
                # EFA and the cluster placement group need every node of the pool in one AZ.
                subnet_ids=[private_subnets[pool.availability_zone].id],
                ami_type="AL2023_x86_64_NVIDIA",
                launch_template={"id": lt.id, "version": lt.latest_version.apply(str)},
                scaling_config=_scaling(pool),
                update_config={"max_unavailable": 1},
                taints=[GPU_TAINT],
                labels={
                    ACCELERATOR_LABEL: "nvidia",
                    POOL_LABEL: pool.name,
                    EFA_LABEL: str(pool.efa).lower(),
                    "deepfleet.io/gpu-model": pool.spec.gpu.name,
                },
                opts=child,
            )

        self.kubeconfig = pulumi.Output.secret(kubeconfig(self.cluster, cfg.region))
        self.provider = k8s.Provider(
            f"{name}-k8s", kubeconfig=self.kubeconfig, opts=pulumi.ResourceOptions(parent=self, depends_on=[system])
        )
        self._plugins(name, cfg)
        self.autoscaler = NodeAutoscaler(
            f"{name}-node-autoscaler",
            cfg,
            self.cluster,
            self.gpu_node_groups,
            scale_down_unneeded_s,
            pulumi.ResourceOptions(provider=self.provider, depends_on=[system]),
            opts=child,
        )
        self.register_outputs({"cluster_name": self.cluster.name, "endpoint": self.cluster.endpoint})

    def _plugins(self, name: str, cfg: Aws) -> None:
        opts = pulumi.ResourceOptions(
            parent=self, provider=self.provider, depends_on=list(self.gpu_node_groups.values())
        )
        gpu_nodes = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": ACCELERATOR_LABEL, "operator": "In", "values": ["nvidia"]}]}
                    ]
                }
            }
        }
        helm.release(
            f"{name}-nvidia-device-plugin",
            helm.NVIDIA_DEVICE_PLUGIN,
            "kube-system",
            {
                "tolerations": [GPU_TOLERATION],
                "affinity": gpu_nodes,
                "config": device_plugin_config("none"),  # EKS GPU nodes are not MIG-partitioned
            },
            opts,
        )
        if any(p.efa for p in cfg.gpu_pools):
            helm.release(
                f"{name}-efa-device-plugin",
                helm.EFA_DEVICE_PLUGIN,
                "kube-system",
                {"tolerations": [GPU_TOLERATION], "nodeSelector": {EFA_LABEL: "true"}},
                opts,
            )
        helm.release(
            f"{name}-fsx-csi", helm.FSX_CSI_DRIVER, "kube-system", {"node": {"tolerations": [GPU_TOLERATION]}}, opts
        )


def _scaling(pool) -> dict:
    return {"min_size": pool.min_size, "max_size": pool.max_size, "desired_size": pool.desired}
