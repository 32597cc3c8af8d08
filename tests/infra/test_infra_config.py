"""The typed stack config: the example stacks are valid; each kind of bad input fails in validation, naming
the key, before any resource is registered."""

from __future__ import annotations

import copy

import pytest

from infra.config import ConfigError, parse, read_stack_file
from infra.mocks import Capture, run


@pytest.mark.parametrize("stack", ["aws", "onprem", "hybrid"])
def test_example_stacks_are_valid(stack: str) -> None:
    cfg = parse(read_stack_file(stack))
    assert cfg.model.name.startswith("deepseek-ai/")
    assert "0.0.0.0/0" not in cfg.networks.allowed


def _aws(edit) -> dict:
    raw = copy.deepcopy(read_stack_file("hybrid"))
    edit(raw)
    return raw


BAD = {
    "unknown GPU type": (
        lambda r: r["aws"]["gpu_pools"][0].update(instance_type="p9.96xlarge"),
        "deepfleet:aws.gpu_pools[0].instance_type: unknown GPU instance type 'p9.96xlarge'",
    ),
    "unknown on-prem GPU model": (
        lambda r: r["onprem"]["hosts"][1].update(gpu_model="B300"),
        "deepfleet:onprem.hosts[1].gpu_model: unknown GPU type 'B300'",
    ),
    "count range min > max": (
        lambda r: r["aws"]["gpu_pools"][0].update(min_size=8, max_size=2, desired_size=None),
        "deepfleet:aws.gpu_pools[0].min_size: 8 > max_size (2)",
    ),
    "EFA on an EFA-incapable type": (
        lambda r: r["aws"]["gpu_pools"][0].update(instance_type="g5.2xlarge"),
        "deepfleet:aws.gpu_pools[0].efa: g5.2xlarge has no EFA interfaces",
    ),
    "overlapping subnets": (
        lambda r: r["aws"].update(private_subnet_cidrs=["10.40.0.0/19", "10.40.16.0/20"]),
        "deepfleet:aws.private_subnet_cidrs: 10.40.16.0/20 overlaps private_subnet_cidrs 10.40.0.0/19",
    ),
    "on-prem network overlapping the VPC": (
        lambda r: (
            r["onprem"].update(network_cidr="10.40.200.0/24")
            or [h.update(address=f"10.40.200.{11 + i}") for i, h in enumerate(r["onprem"]["hosts"])]
        ),
        "deepfleet:onprem.network_cidr: 10.40.200.0/24 overlaps aws.vpc_cidr 10.40.0.0/16",
    ),
    "missing required key": (lambda r: r.pop("model"), "deepfleet:model: required key missing"),
    "missing nested key": (
        lambda r: r["aws"]["gpu_pools"][0].pop("availability_zone"),
        "deepfleet:aws.gpu_pools[0].availability_zone: required key missing",
    ),
    "unknown key (typo)": (
        lambda r: r["workload"].update(imgae="x"),
        "deepfleet:workload.imgae: Extra inputs are not permitted",
    ),
    "world-open allowed network": (
        lambda r: r["networks"].update(allowed=["0.0.0.0/0"]),
        "deepfleet:networks.allowed: Value error, 0.0.0.0/0 opens the API/SSH to the world",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_fails_before_any_resource(case: str) -> None:
    edit, message = BAD[case]
    raw = _aws(edit)
    with pytest.raises(ConfigError) as err:
        parse(raw)
    assert message.replace("Value error, ", "") in str(err.value)
    # The same input through the program: it stops in config validation, nothing is registered.
    capture = Capture("bad")
    with pytest.raises(ConfigError, match="invalid stack config"):
        run("hybrid", raw, capture)
    assert capture.resources == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["autoscaling"].update(min_replicas=12), "deepfleet:autoscaling.min_replicas: 12 > max_replicas"),
        (lambda r: r["workload"]["resources"].update(cpu_request=64), "deepfleet:workload.resources.cpu_request: 64"),
        (lambda r: r["storage"].update(cold={"glacier_days": 20}), "deepfleet:storage.cold.glacier_days: need"),
        (lambda r: r["aws"].update(vpc_cidr="10.40.0.0/33"), "deepfleet:aws.vpc_cidr: not an IPv4 CIDR network"),
        (lambda r: r["storage"]["fsx"].update(storage_capacity_gib=3000), "deepfleet:storage.fsx.storage_capacity_gib"),
        (
            lambda r: r["aws"]["gpu_pools"][0].update(availability_zone="us-east-1f"),
            "deepfleet:aws.gpu_pools[0].availability_zone: us-east-1f not in availability_zones",
        ),
        (lambda r: r.pop("storage"), "deepfleet:storage: required when aws is set"),
        (lambda r: r.pop("workload"), "deepfleet:routing: needs onprem hosts"),
    ],
)
def test_cross_field_errors_name_the_key(edit, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(_aws(edit))
    assert message in str(err.value)


def test_program_rejects_an_unknown_top_level_key() -> None:
    raw = _aws(lambda r: r.update(autoscalling={"min_replicas": 3}))
    capture = Capture("bad")
    with pytest.raises(ConfigError, match="deepfleet:autoscalling: unknown key"):
        run("hybrid", raw, capture)
    assert capture.resources == []


def test_gpus_per_pod_must_fit_a_node() -> None:
    raw = _aws(lambda r: r["workload"]["resources"].update(gpus=16))
    with pytest.raises(ConfigError, match=r"deepfleet:workload.resources.gpus: .*less than or equal to 8"):
        parse(raw)


def test_unknown_stack_file_is_named() -> None:
    with pytest.raises(ConfigError, match="no stack file Pulumi.nowhere.yaml"):
        read_stack_file("nowhere")
