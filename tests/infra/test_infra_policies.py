"""Each policy with a passing and a violating input, and all policies over every example stack."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from infra import policies
from infra.mocks import Capture


@dataclass
class R:
    type: str
    name: str = "r"
    inputs: dict = field(default_factory=dict)
    id: str = "r-id"


SG = "aws:ec2/securityGroup:SecurityGroup"
LT = "aws:ec2/launchTemplate:LaunchTemplate"
BUCKET = "aws:s3/bucket:Bucket"
SSE = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
PAB = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
ALL_BLOCKED = {
    "bucket": "r-id",
    "blockPublicAcls": True,
    "blockPublicPolicy": True,
    "ignorePublicAcls": True,
    "restrictPublicBuckets": True,
}


def _gpu_deployment(container: dict, tolerate: bool = True) -> R:
    spec = {"containers": [container], "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}] * tolerate}
    return R("kubernetes:apps/v1:Deployment", inputs={"spec": {"template": {"spec": spec}}})


# policy -> (compliant resources, violating scenarios: each must be flagged on its own)
CASES = {
    "no-world-admin-ingress": (
        [
            R(
                SG,
                inputs={
                    "ingress": [
                        {"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["10.0.0.0/8"]},
                        {"protocol": "tcp", "fromPort": 80, "toPort": 80, "cidrBlocks": ["0.0.0.0/0"]},
                    ]
                },
            ),
            R(
                "aws:eks/cluster:Cluster",
                inputs={"vpcConfig": {"endpointPublicAccess": True, "publicAccessCidrs": ["10.0.0.0/8"]}},
            ),
        ],
        [
            [
                R(
                    SG,
                    inputs={
                        "ingress": [{"protocol": "tcp", "fromPort": 0, "toPort": 1024, "cidrBlocks": ["0.0.0.0/0"]}]
                    },
                )
            ],
            [R(SG, inputs={"ingress": [{"protocol": "-1", "fromPort": 0, "toPort": 0, "ipv6CidrBlocks": ["::/0"]}]})],
            [
                R(
                    "aws:ec2/securityGroupRule:SecurityGroupRule",
                    inputs={
                        "type": "ingress",
                        "protocol": "tcp",
                        "fromPort": 8000,
                        "toPort": 8000,
                        "cidrBlocks": ["0.0.0.0/0"],
                    },
                )
            ],
            [R("aws:eks/cluster:Cluster", inputs={"vpcConfig": {"endpointPublicAccess": True}})],
        ],
    ),
    "imdsv2-required": (
        [R(LT, inputs={"metadataOptions": {"httpTokens": "required"}})],
        [
            [R(LT, inputs={"metadataOptions": {"httpTokens": "optional"}})],
            [R(LT)],
            [R("aws:ec2/instance:Instance", inputs={})],
        ],
    ),
    "encryption-at-rest": (
        [
            R(LT, inputs={"blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"encrypted": "true"}}]}),
            R(BUCKET),
            R(SSE, inputs={"bucket": "r-id"}),
            R("aws:fsx/lustreFileSystem:LustreFileSystem", inputs={"kmsKeyId": "arn:k"}),
            R("aws:eks/cluster:Cluster", inputs={"encryptionConfig": {"resources": ["secrets"]}}),
        ],
        [
            [R(LT, inputs={"blockDeviceMappings": [{"deviceName": "/dev/xvdb", "ebs": {"encrypted": "false"}}]})],
            [R("aws:ebs/volume:Volume", inputs={"encrypted": False})],
            [R(BUCKET, id="other"), R(SSE, inputs={"bucket": "r-id"})],
            [R("aws:fsx/lustreFileSystem:LustreFileSystem")],
            [R("aws:eks/cluster:Cluster")],
        ],
    ),
    "no-public-buckets": (
        [
            R(BUCKET),
            R(PAB, inputs=ALL_BLOCKED),
            R(
                "aws:s3/bucketPolicy:BucketPolicy",
                inputs={
                    "policy": json.dumps(
                        {
                            "Statement": [
                                {
                                    "Effect": "Deny",
                                    "Principal": "*",
                                    "Action": "s3:*",
                                    "Condition": {"Bool": {"x": "false"}},
                                }
                            ]
                        }
                    )
                },
            ),
        ],
        [
            [R(BUCKET), R(PAB, inputs={**ALL_BLOCKED, "restrictPublicBuckets": False})],
            [R(BUCKET)],
            [R(BUCKET, inputs={"acl": "public-read"}), R(PAB, inputs=ALL_BLOCKED)],
            [R("aws:s3/bucketAcl:BucketAcl", inputs={"acl": "public-read-write"})],
            [
                R(
                    "aws:s3/bucketPolicy:BucketPolicy",
                    inputs={
                        "policy": json.dumps(
                            {"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject"}]}
                        )
                    },
                )
            ],
        ],
    ),
    "iam-least-privilege": (
        [
            R(
                "aws:iam/rolePolicy:RolePolicy",
                inputs={
                    "policy": json.dumps(
                        {
                            "Statement": [
                                {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "arn:aws:s3:::models/*"},
                                {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"},
                            ]
                        }
                    )
                },
            ),
            R(
                "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
                inputs={"policyArn": "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy"},
            ),
        ],
        [
            [
                R(
                    "aws:iam/policy:Policy",
                    inputs={"policy": json.dumps({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})},
                )
            ],
            [
                R(
                    "aws:iam/rolePolicy:RolePolicy",
                    inputs={
                        "policy": json.dumps({"Statement": {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["*"]}})
                    },
                )
            ],
            [
                R(
                    "aws:iam/rolePolicyAttachment:RolePolicyAttachment",
                    inputs={"policyArn": "arn:aws:iam::aws:policy/AdministratorAccess"},
                )
            ],
        ],
    ),
    "gpu-pods-set-limits": (
        [
            _gpu_deployment(
                {"name": "c", "resources": {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}}
            ),
            _gpu_deployment({"name": "cpu-only"}, tolerate=False),
        ],
        [
            [_gpu_deployment({"name": "c", "resources": {"requests": {"nvidia.com/gpu": "2"}}}, tolerate=False)],
            [_gpu_deployment({"name": "c", "resources": {"limits": {"cpu": "4"}}})],
            [
                _gpu_deployment(
                    {"name": "c", "resources": {"requests": {"nvidia.com/gpu": "4"}, "limits": {"nvidia.com/gpu": "2"}}}
                )
            ],
        ],
    ),
}


@pytest.mark.parametrize("policy", sorted(policies.POLICIES))
def test_policy_passes_good_input_and_flags_each_bad_one(policy: str) -> None:
    check = policies.POLICIES[policy]
    good, bad = CASES[policy]
    assert check(good) == []
    for scenario in bad:
        violations = check(scenario)
        assert violations, scenario
        assert {v.policy for v in violations} == {policy}


def test_every_example_stack_passes_every_policy(any_stack: Capture) -> None:
    assert policies.check_all(any_stack.resources) == []


def test_policies_see_the_real_stack_inputs(aws_stack: Capture) -> None:
    # Opening the EFA group to the world on SSH must be caught on the captured program inputs.
    resources = list(aws_stack.resources)
    sg = aws_stack.one(SG, "deepfleet-p4d-efa")
    opened = R(
        SG,
        sg.name,
        {**sg.inputs, "ingress": [{"protocol": "tcp", "fromPort": 22, "toPort": 22, "cidrBlocks": ["0.0.0.0/0"]}]},
        sg.id,
    )
    violations = policies.check_all([opened if r is sg else r for r in resources])
    assert [(v.policy, v.resource) for v in violations] == [("no-world-admin-ingress", "deepfleet-p4d-efa")]
