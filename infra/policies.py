"""Security policies (what a CrossGuard pack would enforce) as plain functions over captured resources:
each takes resources with `.type`, `.name`, `.id`, `.inputs` (Pulumi wire names, camelCase) and returns the
violations. `check_all` runs every policy; the tests run it on every example stack."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from deepfleet.defaults import API_PORT
from infra.gpu_catalog import GPU_RESOURCE

ADMIN_PORTS = (22, 443, 6443, API_PORT)  # SSH, the Kubernetes API, the inference API
WORLD = ("0.0.0.0/0", "::/0")
SG = "aws:ec2/securityGroup:SecurityGroup"
SG_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"
LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
INSTANCE = "aws:ec2/instance:Instance"
BUCKET = "aws:s3/bucket:Bucket"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


class Resource(Protocol):
    type: str
    name: str
    id: str
    inputs: dict[str, Any]


@dataclass(frozen=True)
class Violation:
    policy: str
    resource: str
    message: str


def _covers(rule: dict, port: int) -> bool:
    if str(rule.get("protocol")) in ("-1", "all"):
        return True
    return int(rule.get("fromPort", 0)) <= port <= int(rule.get("toPort", 0))


def no_world_admin_ingress(resources: Iterable[Resource]) -> list[Violation]:
    """No 0.0.0.0/0 (or ::/0) ingress on SSH or an API port; no EKS public endpoint open to the world."""
    out = []
    for r in resources:
        if r.type == SG:
            rules = r.inputs.get("ingress", [])
        elif r.type == SG_RULE and r.inputs.get("type") == "ingress":
            rules = [r.inputs]
        else:
            rules = []
        for rule in rules:
            cidrs = [*rule.get("cidrBlocks", []), *rule.get("ipv6CidrBlocks", [])]
            ports = [p for p in ADMIN_PORTS if _covers(rule, p)]
            if any(c in WORLD for c in cidrs) and ports:
                out.append(Violation("no-world-admin-ingress", r.name, f"ingress from the world on port(s) {ports}"))
        if r.type == "aws:eks/cluster:Cluster":
            vpc = r.inputs.get("vpcConfig", {})
            # An EKS public endpoint without publicAccessCidrs is open to 0.0.0.0/0.
            cidrs = vpc.get("publicAccessCidrs") or list(WORLD[:1])
            if vpc.get("endpointPublicAccess", True) and any(c in WORLD for c in cidrs):
                out.append(Violation("no-world-admin-ingress", r.name, "EKS API endpoint public to the world"))
    return out


def imdsv2_required(resources: Iterable[Resource]) -> list[Violation]:
    """Every launch template and instance requires IMDSv2 session tokens."""
    return [
        Violation("imdsv2-required", r.name, "metadataOptions.httpTokens must be 'required'")
        for r in resources
        if r.type in (LAUNCH_TEMPLATE, INSTANCE) and r.inputs.get("metadataOptions", {}).get("httpTokens") != "required"
    ]


def _true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def encryption_at_rest(resources: Iterable[Resource]) -> list[Violation]:
    """EBS (launch templates, instances, volumes), S3 buckets, FSx and EKS secrets are encrypted (KMS)."""
    resources = list(resources)
    out = []
    sse_buckets = {
        r.inputs.get("bucket")
        for r in resources
        if r.type == "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
    }
    for r in resources:
        if r.type in (LAUNCH_TEMPLATE, INSTANCE):
            devices = r.inputs.get("blockDeviceMappings", [])
            if r.type == INSTANCE:
                devices = [{"ebs": r.inputs.get("rootBlockDevice", {})}, *devices]
            for d in devices:
                if "ebs" in d and not _true(d["ebs"].get("encrypted")):
                    out.append(
                        Violation("encryption-at-rest", r.name, f"EBS {d.get('deviceName', 'root')} unencrypted")
                    )
        elif r.type == "aws:ebs/volume:Volume" and not _true(r.inputs.get("encrypted")):
            out.append(Violation("encryption-at-rest", r.name, "EBS volume unencrypted"))
        elif r.type == BUCKET and r.id not in sse_buckets:
            out.append(Violation("encryption-at-rest", r.name, "bucket has no server-side encryption configuration"))
        elif r.type == "aws:fsx/lustreFileSystem:LustreFileSystem" and not r.inputs.get("kmsKeyId"):
            out.append(Violation("encryption-at-rest", r.name, "FSx without a customer-managed KMS key"))
        elif r.type == "aws:eks/cluster:Cluster" and "secrets" not in r.inputs.get("encryptionConfig", {}).get(
            "resources", []
        ):
            out.append(Violation("encryption-at-rest", r.name, "EKS secrets not envelope-encrypted"))
    return out


def _public_statement(policy: Any) -> bool:
    doc = json.loads(policy) if isinstance(policy, str) else policy
    return any(
        s.get("Effect") == "Allow" and s.get("Principal") in ("*", {"AWS": "*"}) and not s.get("Condition")
        for s in doc.get("Statement", [])
    )


def no_public_buckets(resources: Iterable[Resource]) -> list[Violation]:
    """Every bucket has a full public access block; no public ACL; no bucket policy allowing anyone."""
    resources = list(resources)
    blocked = {
        r.inputs.get("bucket")
        for r in resources
        if r.type == "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
        and all(
            _true(r.inputs.get(k))
            for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
        )
    }
    out = []
    for r in resources:
        if r.type == BUCKET:
            if r.id not in blocked:
                out.append(Violation("no-public-buckets", r.name, "no public access block with all four settings"))
            if str(r.inputs.get("acl", "private")).startswith("public"):
                out.append(Violation("no-public-buckets", r.name, f"public ACL {r.inputs['acl']}"))
        elif r.type == "aws:s3/bucketAcl:BucketAcl" and str(r.inputs.get("acl", "")).startswith("public"):
            out.append(Violation("no-public-buckets", r.name, f"public ACL {r.inputs['acl']}"))
        elif r.type == "aws:s3/bucketPolicy:BucketPolicy" and _public_statement(r.inputs.get("policy", "{}")):
            out.append(Violation("no-public-buckets", r.name, "bucket policy allows Principal '*'"))
    return out


def _pod_spec(r: Resource) -> dict | None:
    if not r.type.startswith("kubernetes:"):
        return None
    kind = r.type.rsplit(":", 1)[1]
    spec = r.inputs.get("spec", {})
    if kind == "Pod":
        return spec
    if kind in WORKLOAD_KINDS:
        return spec.get("template", {}).get("spec", {})
    return None


def gpu_pods_set_limits(resources: Iterable[Resource]) -> list[Violation]:
    """A GPU pod (requests GPUs or tolerates the GPU taint) sets nvidia.com/gpu limits, equal to any request."""
    out = []
    for r in resources:
        spec = _pod_spec(r)
        if spec is None:
            continue
        containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
        tolerates = any(t.get("key") == GPU_RESOURCE for t in spec.get("tolerations", []))
        limited = False
        for c in containers:
            res = c.get("resources", {})
            request, limit = res.get("requests", {}).get(GPU_RESOURCE), res.get("limits", {}).get(GPU_RESOURCE)
            if request is not None and str(request) != str(limit):
                out.append(
                    Violation(
                        "gpu-pods-set-limits",
                        r.name,
                        f"container {c.get('name')}: GPU request {request} without an equal limit",
                    )
                )
            limited = limited or (limit is not None and int(limit) > 0)
        if tolerates and not limited:
            out.append(Violation("gpu-pods-set-limits", r.name, "tolerates GPU nodes but no container sets GPU limits"))
    return out


# AWS managed policies that grant (nearly) everything: never attached by this program.
BROAD_MANAGED_POLICIES = ("AdministratorAccess", "PowerUserAccess", "IAMFullAccess", "AmazonS3FullAccess")


def _wildcard_statements(policy: Any) -> list[dict]:
    doc = json.loads(policy) if isinstance(policy, str) else policy
    statements = doc.get("Statement", [])
    statements = [statements] if isinstance(statements, dict) else statements
    out = []
    for s in statements:
        actions = s.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = s.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if s.get("Effect") == "Allow" and any(a == "*" or a.endswith(":*") for a in actions) and "*" in resources:
            out.append(s)
    return out


def iam_least_privilege(resources: Iterable[Resource]) -> list[Violation]:
    """No IAM policy allows every action of a service (`*`, `svc:*`) on every resource; no admin-level managed
    policies attached. (KMS key policies are resource policies, not IAM: their account-root statement is AWS's
    default and is not checked here.)"""
    out = []
    for r in resources:
        if r.type in ("aws:iam/policy:Policy", "aws:iam/rolePolicy:RolePolicy") and _wildcard_statements(
            r.inputs.get("policy", "{}")
        ):
            out.append(Violation("iam-least-privilege", r.name, "allows all actions of a service on all resources"))
        elif (
            r.type == "aws:iam/rolePolicyAttachment:RolePolicyAttachment"
            and str(r.inputs.get("policyArn", "")).rsplit("/", 1)[-1] in BROAD_MANAGED_POLICIES
        ):
            out.append(Violation("iam-least-privilege", r.name, f"attaches {r.inputs['policyArn']}"))
    return out


POLICIES: dict[str, Callable[[Iterable[Resource]], list[Violation]]] = {
    "no-world-admin-ingress": no_world_admin_ingress,
    "imdsv2-required": imdsv2_required,
    "encryption-at-rest": encryption_at_rest,
    "no-public-buckets": no_public_buckets,
    "gpu-pods-set-limits": gpu_pods_set_limits,
    "iam-least-privilege": iam_least_privilege,
}


def check_all(resources: Iterable[Resource]) -> list[Violation]:
    resources = list(resources)
    return [v for policy in POLICIES.values() for v in policy(resources)]


# ---- stack config: secrets belong in `pulumi config set --secret` (stored encrypted as {secure: ...}) or in a
# secret store the stack only names (workload.security), never in plain text in Pulumi.<stack>.yaml.
_SECRET_NAME = re.compile(r"(^|_)(password|passwd|passphrase|token|api_key|secret_key|access_key|private_key|"
                          r"tls_key|weights_key|pin|credentials?)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|\beyJ[\w-]+\.[\w-]+\.[\w-]+")


def _plain_secrets(value: Any, path: str) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        if set(value) == {"secure"}:  # encrypted by Pulumi: fine
            return []
        found = []
        for key, inner in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _SECRET_NAME.search(str(key)) and not isinstance(inner, dict | list) and inner not in (None, ""):
                found.append((where, f"{key} looks like a secret and is stored in plain text"))
            else:
                found += _plain_secrets(inner, where)
        return found
    if isinstance(value, list):
        return [hit for i, inner in enumerate(value) for hit in _plain_secrets(inner, f"{path}[{i}]")]
    if isinstance(value, str) and _SECRET_VALUE.search(value):
        return [(path, "holds a private key or a signed token in plain text")]
    return []


def plain_secrets_in_stack_config(config: dict[str, Any]) -> list[Violation]:
    """`config`: a stack's settings without the `deepfleet:` prefix (config.read_stack_file)."""
    return [Violation("no-plain-secrets-in-stack-config", where, f"{why}: use `pulumi config set --secret`, or keep "
                      "it in the secret store and name the Kubernetes Secret in workload.security")
            for where, why in _plain_secrets(config, "")]


def stack_config_violations(stack: str) -> list[Violation]:
    from infra.config import read_stack_file

    return plain_secrets_in_stack_config(read_stack_file(stack))
