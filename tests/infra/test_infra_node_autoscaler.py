"""The aws example stack's node autoscaler under Pulumi's mocks: cluster-autoscaler as a Helm release on the
system nodes, discovering this cluster's node groups, with an IAM role (EKS Pod Identity) that may resize only
this cluster's groups, and the EFA count of each EFA pool as a node-template tag (scale from zero)."""

from __future__ import annotations

import json

import pytest

from infra import helm, mocks
from infra.config import ConfigError, read_stack_file
from infra.mocks import Capture

ROLE = "deepfleet-node-autoscaler-role"


def _release(capture: Capture) -> dict:
    (release,) = [r.inputs for r in capture.of_type("kubernetes:helm.sh/v3:Release")
                  if r.inputs["name"] == "cluster-autoscaler"]
    return release


def test_cluster_autoscaler_release_discovers_this_cluster_from_the_system_nodes(aws_stack: Capture) -> None:
    release = _release(aws_stack)
    assert (release["chart"], release["version"], release["repositoryOpts"]["repo"], release["namespace"]) == (
        "cluster-autoscaler", "9.38.0", "https://kubernetes.github.io/autoscaler", "kube-system")
    values = release["values"]
    assert values["autoDiscovery"] == {"clusterName": "deepfleet"}
    assert values["awsRegion"] == "us-east-1" and values["cloudProvider"] == "aws"
    assert values["image"] == {"tag": "v1.31.0"}  # the cluster's Kubernetes minor (Pulumi.aws.yaml: 1.31)
    assert values["nodeSelector"] == {"deepfleet.io/role": "system"}
    assert values["rbac"]["serviceAccount"]["name"] == "cluster-autoscaler"
    args = values["extraArgs"]
    assert args["skip-nodes-with-local-storage"] == "false"  # the warm weight cache is an emptyDir
    assert args["scale-down-unneeded-time"] == "300s"  # autoscaling.scale_down_cooldown_s default


def test_its_role_resizes_only_this_clusters_node_groups(aws_stack: Capture) -> None:
    trust = json.loads(aws_stack.one("aws:iam/role:Role", ROLE).inputs["assumeRolePolicy"])
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
                                   "Action": ["sts:AssumeRole", "sts:TagSession"]}]
    (inline,) = aws_stack.of_type("aws:iam/rolePolicy:RolePolicy")
    statements = json.loads(inline.inputs["policy"])["Statement"]
    writes = [s for s in statements if any(not a.split(":")[1].startswith(("Describe", "Get")) for a in s["Action"])]
    assert writes == [{
        "Effect": "Allow",
        "Action": ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"],
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:ResourceTag/k8s.io/cluster-autoscaler/deepfleet": "owned"}},
    }]
    (assoc,) = [r.inputs for r in aws_stack.of_type("aws:eks/podIdentityAssociation:PodIdentityAssociation")]
    assert (assoc["namespace"], assoc["serviceAccount"], assoc["roleArn"]) == (
        "kube-system", "cluster-autoscaler", f"arn:aws:iam:us-east-1:{mocks.ACCOUNT_ID}:{ROLE}")
    addons = {r.inputs["addonName"] for r in aws_stack.of_type("aws:eks/addon:Addon")}
    assert "eks-pod-identity-agent" in addons


def test_efa_pools_tell_the_autoscaler_their_efa_devices(aws_stack: Capture) -> None:
    tags = {r.inputs["autoscalingGroupName"]: r.inputs["tag"] for r in aws_stack.of_type("aws:autoscaling/tag:Tag")}
    key = "k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"
    # p4d.24xlarge: 4 EFA interfaces, p5.48xlarge: 32 (AWS instance type documentation)
    assert tags == {
        "eks-deepfleet-p4d-asg": {"key": key, "value": "4", "propagateAtLaunch": False},
        "eks-deepfleet-p5-asg": {"key": key, "value": "32", "propagateAtLaunch": False},
    }


def test_a_cluster_version_the_autoscaler_does_not_match_is_refused() -> None:
    raw = read_stack_file("aws")
    raw["aws"] = dict(raw["aws"], kubernetes_version="1.32")
    with pytest.raises(ConfigError) as err:
        mocks.run("aws", raw)
    assert "aws.kubernetes_version: 1.32" in str(err.value), err.value
    assert f"chart {helm.CLUSTER_AUTOSCALER.version}) is for 1.31" in str(err.value), err.value
