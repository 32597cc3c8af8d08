"""Node autoscaling on AWS: the Kubernetes cluster-autoscaler adds GPU nodes when pods go Pending (the HPA asks
for more replicas than the nodes have GPUs) and removes idle ones, inside each pool's min_size..max_size.

Why cluster-autoscaler and not Karpenter: every GPU pool is one instance type in one AZ, launched from our own
launch template (one EFA interface per network card, a cluster placement group, the nodeadm RAID0 instance
store). Karpenter launches from its EC2NodeClass instead, which has no placement groups
(aws/karpenter-provider-aws#3324, open), so an EFA pool would lose the co-location its NCCL traffic needs; and
its gains (choosing among many instance types, consolidation) do not apply to single-type pools whose nodes
hold a warm weight cache. The autoscaler scales the managed node groups we already declare (EKS tags their
Auto Scaling groups for discovery), from zero too: labels and taints come from eks:DescribeNodegroup, the GPU
count from the instance type, the EFA device count from the node-template tag set here."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from infra import helm
from infra.config import Aws, ConfigError, GpuPool

SERVICE_ACCOUNT = "cluster-autoscaler"
NAMESPACE = "kube-system"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
NODE_TEMPLATE_EFA_TAG = f"k8s.io/cluster-autoscaler/node-template/resources/{EFA_RESOURCE}"
SYSTEM_NODES = {"deepfleet.io/role": "system"}

_DESCRIBE = [
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeAutoScalingInstances",
    "autoscaling:DescribeLaunchConfigurations",
    "autoscaling:DescribeScalingActivities",
    "autoscaling:DescribeTags",
    "ec2:DescribeImages",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeLaunchTemplateVersions",
    "ec2:GetInstanceTypesFromInstanceRequirements",
    "eks:DescribeNodegroup",
]
_SCALE = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]


def policy(cluster_name: str) -> dict:
    """Read anything it needs to plan; resize and terminate only in this cluster's node groups (EKS tags their
    Auto Scaling groups k8s.io/cluster-autoscaler/<cluster>=owned)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": _DESCRIBE, "Resource": "*"},
            {
                "Effect": "Allow",
                "Action": _SCALE,
                "Resource": "*",
                "Condition": {"StringEquals": {f"aws:ResourceTag/k8s.io/cluster-autoscaler/{cluster_name}": "owned"}},
            },
        ],
    }


def values(cluster_name: str, cfg: Aws, scale_down_unneeded_s: int) -> dict:
    return {
        "cloudProvider": "aws",
        "awsRegion": cfg.region,
        "autoDiscovery": {"clusterName": cluster_name},
        "image": {"tag": f"v{helm.CLUSTER_AUTOSCALER.app_version}"},
        "rbac": {"serviceAccount": {"create": True, "name": SERVICE_ACCOUNT}},
        "nodeSelector": SYSTEM_NODES,
        "extraArgs": {
            # GPU nodes keep the warm weight cache in an emptyDir: without this they would never scale in.
            "skip-nodes-with-local-storage": "false",
            "balance-similar-node-groups": "true",
            "expander": "least-waste",
            # a node stays this long after its last replica left (the HPA's scale-in window, not sooner)
            "scale-down-unneeded-time": f"{scale_down_unneeded_s}s",
        },
    }


class NodeAutoscaler(pulumi.ComponentResource):
    """cluster-autoscaler (Helm) with its own IAM role through EKS Pod Identity, and the EFA node-template tag
    on the Auto Scaling group of each EFA pool."""

    def __init__(
        self,
        name: str,
        cfg: Aws,
        cluster: aws.eks.Cluster,
        gpu_node_groups: dict[str, aws.eks.NodeGroup],
        scale_down_unneeded_s: int,
        k8s_opts: pulumi.ResourceOptions,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        minor = helm.CLUSTER_AUTOSCALER.app_version.rsplit(".", 1)[0]
        if cfg.kubernetes_version != minor:
            raise ConfigError(
                f"aws.kubernetes_version: {cfg.kubernetes_version}, but cluster-autoscaler "
                f"{helm.CLUSTER_AUTOSCALER.app_version} (chart {helm.CLUSTER_AUTOSCALER.version}) is for {minor}: "
                "move infra/helm.py CLUSTER_AUTOSCALER with the cluster"
            )
        super().__init__("deepfleet:aws:NodeAutoscaler", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.role = aws.iam.Role(
            f"{name}-role",
            assume_role_policy=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "pods.eks.amazonaws.com"},
                            "Action": ["sts:AssumeRole", "sts:TagSession"],
                        }
                    ],
                }
            ),
            opts=child,
        )
        aws.iam.RolePolicy(
            f"{name}-policy",
            role=self.role.id,
            policy=cluster.name.apply(lambda n: json.dumps(policy(n))),
            opts=pulumi.ResourceOptions(parent=self.role),
        )
        aws.eks.PodIdentityAssociation(
            f"{name}-identity",
            cluster_name=cluster.name,
            namespace=NAMESPACE,
            service_account=SERVICE_ACCOUNT,
            role_arn=self.role.arn,
            opts=child,
        )
        pools = {p.name: p for p in cfg.gpu_pools}
        for pool_name, group in gpu_node_groups.items():
            if pools[pool_name].efa:
                _efa_template_tag(f"{name}-{pool_name}-efa", pools[pool_name], group, child)
        self.release = helm.release(
            f"{name}-release",
            helm.CLUSTER_AUTOSCALER,
            NAMESPACE,
            cluster.name.apply(lambda n: values(n, cfg, scale_down_unneeded_s)),
            pulumi.ResourceOptions.merge(k8s_opts, pulumi.ResourceOptions(parent=self)),
        )
        self.register_outputs({"role_arn": self.role.arn})


def _efa_template_tag(name: str, pool: GpuPool, group: aws.eks.NodeGroup, opts: pulumi.ResourceOptions) -> None:
    """Scale-from-zero: a pod requesting EFA devices fits a node of this pool only if the autoscaler knows
    the node would have them (the device plugin reports them once the node runs)."""
    aws.autoscaling.Tag(
        name,
        autoscaling_group_name=group.resources.apply(lambda r: r[0].autoscaling_groups[0].name),
        tag={"key": NODE_TEMPLATE_EFA_TAG, "value": str(pool.spec.efa_interfaces), "propagate_at_launch": False},
        opts=opts,
    )
