"""Run the Pulumi program without the CLI: Pulumi's official mocks (`pulumi.runtime.set_mocks`, preview=False),
recording every registered resource with its parent and inputs. Used by `python -m infra.plan` and the tests.

Nothing here reaches a network: provider functions are answered locally and plugins are never started."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import rpc
from pulumi.runtime.mocks import MockMonitor

from infra import config as stack_config

ACCOUNT_ID = "123456789012"
STACK_TYPE = "pulumi:pulumi:Stack"


@dataclass
class Recorded:
    urn: str
    id: str
    type: str
    name: str
    inputs: dict[str, Any]
    custom: bool
    parent: str | None = None  # the parent's URN; None for children of the stack


@dataclass
class Capture:
    stack: str
    resources: list[Recorded] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def of_type(self, type_: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == type_]

    def one(self, type_: str, name: str) -> Recorded:
        found = [r for r in self.resources if r.type == type_ and r.name == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} resources of type {type_} named {name}")
        return found[0]

    def by_urn(self) -> dict[str, Recorded]:
        return {r.urn: r for r in self.resources}


def _computed(args: pulumi.runtime.MockResourceArgs) -> dict[str, Any]:
    """Outputs a real provider would compute, for the types whose outputs the program reads."""
    arn = f"arn:aws:{args.typ.split(':')[1].split('/')[0]}:us-east-1:{ACCOUNT_ID}:{args.name}"
    out: dict[str, Any] = {"arn": arn, "name": args.inputs.get("name", args.name)}
    if args.typ == "aws:eks/cluster:Cluster":
        out["endpoint"] = f"https://{args.name}.gr7.us-east-1.eks.amazonaws.com"
        out["certificateAuthority"] = {"data": base64.b64encode(b"mock-ca").decode()}
        out["vpcConfig"] = dict(args.inputs.get("vpcConfig", {}), clusterSecurityGroupId=f"sg-{args.name}-cluster")
    elif args.typ == "aws:fsx/lustreFileSystem:LustreFileSystem":
        out["dnsName"] = f"fs-{args.name}.fsx.us-east-1.amazonaws.com"
        out["mountName"] = "abcdefgh"
    elif args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
        out["latestVersion"] = 1
    elif args.typ == "aws:eks/nodeGroup:NodeGroup":
        out["resources"] = [{"autoscalingGroups": [{"name": f"eks-{args.name}-asg"}]}]
    elif args.typ == "aws:s3/bucket:Bucket":
        out["bucket"] = args.inputs.get("bucket", f"{args.name}-0a1b2c")
    return out


class RecordingMocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        return f"{args.name}-id", {**_computed(args), **args.inputs}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT_ID, "arn": f"arn:aws:iam::{ACCOUNT_ID}:user/ci", "userId": "ci", "id": "ci"}
        if args.token == "aws:index/getPartition:getPartition":
            return {"partition": "aws", "dnsSuffix": "amazonaws.com", "id": "aws"}
        raise NotImplementedError(f"the mocks do not answer {args.token}: add it to infra/mocks.py")


class RecordingMonitor(MockMonitor):
    """MockMonitor that also keeps each registration's parent URN (MockResourceArgs has no parent)."""

    def __init__(self, mocks: RecordingMocks, recorded: list[Recorded]) -> None:
        super().__init__(mocks)
        self.recorded = recorded

    def RegisterResource(self, request):  # noqa: N802 (gRPC method name)
        response = super().RegisterResource(request)
        if request.type != STACK_TYPE:
            parent_type = request.parent.split("::")[2].split("$")[-1] if request.parent else STACK_TYPE
            parent = None if parent_type == STACK_TYPE else request.parent
            self.recorded.append(
                Recorded(
                    response.urn, response.id, request.type, request.name, _plain(request), bool(request.custom), parent
                )
            )
        return response


def _plain(request) -> dict[str, Any]:
    """The registration's own inputs (not the mock's computed outputs), as plain JSON-like data."""
    return json.loads(json.dumps(rpc.deserialize_properties(request.object), default=str))


def run(stack: str, raw_config: dict[str, Any] | None = None, capture: Capture | None = None) -> Capture:
    """Register the stack `stack` (config from Pulumi.<stack>.yaml unless given) under mocks. Resources are
    appended to `capture.resources` as they register, so a caller still sees them if the program raises."""
    from infra.__main__ import main  # the program itself; imported late so mocks are in place first

    raw = stack_config.read_stack_file(stack) if raw_config is None else raw_config
    capture = Capture(stack) if capture is None else capture
    mocks = RecordingMocks()
    monitor = RecordingMonitor(mocks, capture.resources)
    pulumi.runtime.set_mocks(mocks, project=stack_config.NAMESPACE, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config({f"{stack_config.NAMESPACE}:{k}": json.dumps(v) for k, v in raw.items()})

    @pulumi.runtime.test
    def program():
        outputs = main()
        return pulumi.Output.from_input(outputs).apply(capture.outputs.update)

    program()
    return capture
