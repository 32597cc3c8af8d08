"""The aws example stack under Pulumi's mocks: GPU capacity, EKS, storage tiers and their key inputs."""

from __future__ import annotations

import base64
import json

from infra import eks, gpu_catalog, helm
from infra.mocks import Capture

LT = "aws:ec2/launchTemplate:LaunchTemplate"
NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"


def _children(capture: Capture, parent_type: str, parent_name: str) -> list:
    parent = capture.one(parent_type, parent_name)
    return [r for r in capture.resources if r.parent == parent.urn]


def test_launch_templates_have_one_efa_interface_per_network_card(aws_stack: Capture) -> None:
    for pool, count in (("p4d", 4), ("p5", 32)):
        lt = aws_stack.one(LT, f"deepfleet-{pool}-lt").inputs
        nics = lt["networkInterfaces"]
        assert len(nics) == count == gpu_catalog.INSTANCE_TYPES[lt["instanceType"]].efa_interfaces
        assert [n["networkCardIndex"] for n in nics] == list(range(count))
        assert [n["deviceIndex"] for n in nics] == [0] + [1] * (count - 1)
        assert {n["interfaceType"] for n in nics} == {"efa"}
        efa_sg = aws_stack.one("aws:ec2/securityGroup:SecurityGroup", f"deepfleet-{pool}-efa")
        assert all(f"{efa_sg.name}-id" in n["securityGroups"] for n in nics)


def test_launch_templates_require_imdsv2_encrypt_ebs_and_use_a_cluster_placement_group(aws_stack: Capture) -> None:
    kms = aws_stack.one("aws:kms/key:Key", "deepfleet-kms")
    for lt in aws_stack.of_type(LT):
        meta = lt.inputs["metadataOptions"]
        assert meta["httpTokens"] == "required" and meta["httpPutResponseHopLimit"] == 1
        for device in lt.inputs["blockDeviceMappings"]:
            assert device["ebs"]["encrypted"] == "true"
            assert device["ebs"]["kmsKeyId"].endswith(":deepfleet-kms")
    assert kms.inputs["enableKeyRotation"] is True
    p4d = aws_stack.one(LT, "deepfleet-p4d-lt").inputs
    pg = aws_stack.one("aws:ec2/placementGroup:PlacementGroup", "deepfleet-p4d-pg")
    assert pg.inputs["strategy"] == "cluster"
    assert p4d["placement"]["groupName"] == "deepfleet-p4d-pg"
    warm = next(d for d in p4d["blockDeviceMappings"] if d["deviceName"] == "/dev/xvda")["ebs"]
    assert (warm["volumeType"], warm["volumeSize"], warm["iops"], warm["throughput"]) == ("gp3", 500, 16000, 1000)
    user_data = base64.b64decode(p4d["userData"]).decode()
    assert "strategy: RAID0" in user_data  # instance-store NVMe under the pods' emptyDir (warm tier)


def test_efa_security_group_allows_all_traffic_within_itself_only(aws_stack: Capture) -> None:
    sg = aws_stack.one("aws:ec2/securityGroup:SecurityGroup", "deepfleet-p4d-efa").inputs
    for direction in ("ingress", "egress"):
        (rule,) = sg[direction]
        assert rule["protocol"] == "-1" and rule["self"] is True and not rule.get("cidrBlocks")


def test_gpu_node_groups_use_the_nvidia_ami_taint_labels_and_one_az(aws_stack: Capture) -> None:
    for pool in ("p4d", "p5"):
        ng = aws_stack.one(NODE_GROUP, f"deepfleet-{pool}").inputs
        assert ng["amiType"] == "AL2023_x86_64_NVIDIA"
        assert ng["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]
        assert ng["labels"][eks.ACCELERATOR_LABEL] == "nvidia" and ng["labels"][eks.EFA_LABEL] == "true"
        assert ng["subnetIds"] == ["deepfleet-private-0-id"]  # us-east-1a: EFA + placement group
        assert ng["launchTemplate"]["id"] == f"deepfleet-{pool}-lt-id"
    p4d = aws_stack.one(NODE_GROUP, "deepfleet-p4d").inputs["scalingConfig"]
    assert (p4d["minSize"], p4d["maxSize"], p4d["desiredSize"]) == (1, 4, 1)
    system = aws_stack.one(NODE_GROUP, "deepfleet-system").inputs
    assert system["amiType"] == "AL2023_x86_64_STANDARD" and "taints" not in system


def test_cluster_endpoint_secrets_and_least_privilege_roles(aws_stack: Capture) -> None:
    cluster = aws_stack.one("aws:eks/cluster:Cluster", "deepfleet").inputs
    assert cluster["vpcConfig"]["publicAccessCidrs"] == ["10.0.0.0/8"]
    assert cluster["vpcConfig"]["endpointPrivateAccess"] is True
    assert cluster["encryptionConfig"]["resources"] == ["secrets"]
    attached = {
        r.inputs["policyArn"].rsplit("/", 1)[1]
        for r in _children(aws_stack, "aws:iam/role:Role", "deepfleet-node-role")
    }
    assert attached == set(eks.NODE_POLICIES)
    trust = json.loads(aws_stack.one("aws:iam/role:Role", "deepfleet-node-role").inputs["assumeRolePolicy"])
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]
    assert not aws_stack.of_type("aws:iam/policy:Policy")  # no custom (wildcard-prone) policies


def test_private_subnets_and_vpc_endpoints(aws_stack: Capture) -> None:
    vpc = aws_stack.one("aws:ec2/vpc:Vpc", "deepfleet-vpc").inputs
    assert vpc["cidrBlock"] == "10.40.0.0/16"
    endpoints = {
        r.inputs["serviceName"].rsplit(".", 1)[-1]
        if "ecr" not in r.inputs["serviceName"]
        else r.inputs["serviceName"].split("us-east-1.")[1]
        for r in aws_stack.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    }
    assert endpoints == {"s3", "ecr.api", "ecr.dkr", "sts", "ec2", "logs"}
    for subnet in ("deepfleet-private-0", "deepfleet-private-1"):
        assert aws_stack.one("aws:ec2/subnet:Subnet", subnet).inputs["tags"]["kubernetes.io/role/internal-elb"] == "1"


def test_device_plugins_and_fsx_csi_are_helm_releases(aws_stack: Capture) -> None:
    releases = {r.inputs["name"]: r.inputs for r in aws_stack.of_type("kubernetes:helm.sh/v3:Release")}
    for chart in (helm.NVIDIA_DEVICE_PLUGIN, helm.EFA_DEVICE_PLUGIN, helm.FSX_CSI_DRIVER):
        release = releases[chart.release]
        assert (release["chart"], release["version"], release["repositoryOpts"]["repo"]) == (
            chart.chart,
            chart.version,
            chart.repo,
        )
        assert release["namespace"] == "kube-system"
    assert releases["nvidia-device-plugin"]["values"]["tolerations"] == [gpu_catalog.GPU_TOLERATION]
    assert releases["aws-efa-k8s-device-plugin"]["values"]["nodeSelector"] == {eks.EFA_LABEL: "true"}


def test_storage_tiers_and_the_model_weight_flow(aws_stack: Capture) -> None:
    fsx = aws_stack.one("aws:fsx/lustreFileSystem:LustreFileSystem", "deepfleet-fsx").inputs
    assert (fsx["deploymentType"], fsx["storageCapacity"], fsx["perUnitStorageThroughput"]) == (
        "PERSISTENT_2",
        2400,
        250,
    )
    assert fsx["subnetIds"] == "deepfleet-private-0-id"  # same AZ as the GPU pools
    dra = aws_stack.one("aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation", "deepfleet-fsx-models").inputs
    assert dra["dataRepositoryPath"] == "s3://deepfleet-models-0a1b2c/models/"
    assert dra["fileSystemPath"] == "/models"
    assert dra["s3"]["autoImportPolicy"]["events"] == ["NEW", "CHANGED", "DELETED"]
    flow = aws_stack.outputs["model_weight_flow"]
    assert flow["s3"] == "s3://deepfleet-models-0a1b2c/models/deepseek-r1-distill-qwen-32b/"
    assert flow["fsx"].endswith(":/models/deepseek-r1-distill-qwen-32b")
    assert flow["nvme"] == "/models/deepseek-r1-distill-qwen-32b"


def test_cold_tier_lifecycle_versioning_encryption_public_access(aws_stack: Capture) -> None:
    (tiering,) = [
        r.inputs
        for r in aws_stack.of_type("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
        if r.name == "deepfleet-archive-tiering"
    ]
    by_prefix = {rule["filter"]["prefix"]: rule for rule in tiering["rules"]}
    assert set(by_prefix) == {"logs/", "checkpoints/"}
    for rule in by_prefix.values():
        assert [(t["days"], t["storageClass"]) for t in rule["transitions"]] == [(30, "STANDARD_IA"), (90, "GLACIER")]
        assert rule["expiration"]["days"] == 365
    models = aws_stack.one(
        "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration", "deepfleet-models-noncurrent"
    ).inputs["rules"][0]
    assert models["noncurrentVersionTransitions"] == [{"noncurrentDays": 90, "storageClass": "GLACIER"}]
    for bucket in ("deepfleet-models", "deepfleet-archive"):
        bid = f"{bucket}-id"
        versioning = aws_stack.one("aws:s3/bucketVersioning:BucketVersioning", f"{bucket}-versioning").inputs
        assert versioning["bucket"] == bid and versioning["versioningConfiguration"]["status"] == "Enabled"
        sse = aws_stack.one(
            "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration", f"{bucket}-sse"
        ).inputs["rules"][0]["applyServerSideEncryptionByDefault"]
        assert sse["sseAlgorithm"] == "aws:kms"
        pab = aws_stack.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock", f"{bucket}-public-access").inputs
        assert all(
            pab[k] is True
            for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        )


def test_components_nest_their_resources(aws_stack: Capture) -> None:
    types = {r.type for r in _children(aws_stack, "deepfleet:aws:GpuCapacity", "deepfleet-p4d")}
    assert types == {"aws:ec2/placementGroup:PlacementGroup", "aws:ec2/securityGroup:SecurityGroup", LT}


def test_vpc_cni_enforces_network_policy(aws_stack: Capture) -> None:
    addon = next(r.inputs for r in aws_stack.of_type("aws:eks/addon:Addon") if r.inputs["addonName"] == "vpc-cni")
    assert json.loads(addon["configurationValues"]) == {"enableNetworkPolicy": "true"}
