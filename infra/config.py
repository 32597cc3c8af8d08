"""The typed stack config: one schema for everything a stack declares (`Pulumi.<stack>.yaml`, keys
`deepfleet:<key>`). Validation runs before any resource is registered; every error names its key."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import Annotated, Any, Literal

import pulumi
import yaml
from pulumi.runtime import config as runtime_config
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import deepfleet
from deepfleet.defaults import IMAGE_REPOSITORY
from infra import gpu_catalog

NAMESPACE = "deepfleet"  # the Pulumi project name, the prefix of every config key
ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A stack config that must not reach resource registration. The message names each bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Cidr = str


def _network(value: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(value, strict=True)


def _check_cidr(value: str) -> str:
    try:
        _network(value)
    except ValueError as e:
        raise ValueError(f"not an IPv4 CIDR network: {e}") from None
    return value


class SizeRange(Strict):
    min_size: int = Field(ge=0)
    max_size: int = Field(ge=1)
    desired_size: int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SizeRange:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size: {self.min_size} > max_size ({self.max_size})")
        desired = self.desired
        if not self.min_size <= desired <= self.max_size:
            raise ValueError(f"desired_size: {desired} outside min_size..max_size ({self.min_size}..{self.max_size})")
        return self

    @property
    def desired(self) -> int:
        return self.min_size if self.desired_size is None else self.desired_size


class SystemPool(SizeRange):
    instance_type: str = "m6i.xlarge"


class GpuPool(SizeRange):
    name: str = Field(pattern=r"^[a-z0-9-]{1,20}$")
    instance_type: str
    efa: bool = False
    # EFA and the cluster placement group keep a pool in one AZ; it must be one of aws.availability_zones.
    availability_zone: str

    @field_validator("instance_type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in gpu_catalog.INSTANCE_TYPES:
            known = ", ".join(sorted(gpu_catalog.INSTANCE_TYPES))
            raise ValueError(f"unknown GPU instance type {value!r} (known: {known})")
        return value

    @model_validator(mode="after")
    def _efa_capable(self) -> GpuPool:
        if self.efa and not gpu_catalog.INSTANCE_TYPES[self.instance_type].efa_capable:
            raise ValueError(f"efa: {self.instance_type} has no EFA interfaces; set efa: false or pick an EFA type")
        return self

    @property
    def spec(self) -> gpu_catalog.InstanceType:
        return gpu_catalog.INSTANCE_TYPES[self.instance_type]


class Aws(Strict):
    region: str
    availability_zones: list[str] = Field(min_length=2)
    vpc_cidr: Cidr
    private_subnet_cidrs: list[Cidr] = Field(min_length=2)
    public_subnet_cidrs: list[Cidr] = Field(min_length=1)
    kubernetes_version: str = "1.31"
    system_pool: SystemPool
    gpu_pools: list[GpuPool] = Field(min_length=1)

    _cidrs = field_validator("vpc_cidr")(_check_cidr)

    @field_validator("private_subnet_cidrs", "public_subnet_cidrs")
    @classmethod
    def _cidr_list(cls, values: list[str]) -> list[str]:
        return [_check_cidr(v) for v in values]

    @model_validator(mode="after")
    def _layout(self) -> Aws:
        if len(self.private_subnet_cidrs) != len(self.availability_zones):
            raise ValueError("private_subnet_cidrs: need one subnet per entry of availability_zones")
        vpc = _network(self.vpc_cidr)
        subnets = [("private_subnet_cidrs", c) for c in self.private_subnet_cidrs]
        subnets += [("public_subnet_cidrs", c) for c in self.public_subnet_cidrs]
        for key, cidr in subnets:
            if not _network(cidr).subnet_of(vpc):
                raise ValueError(f"{key}: {cidr} is not inside vpc_cidr {self.vpc_cidr}")
        for (key_a, a), (key_b, b) in combinations(subnets, 2):
            if _network(a).overlaps(_network(b)):
                raise ValueError(f"{key_b}: {b} overlaps {key_a} {a}")
        for i, pool in enumerate(self.gpu_pools):
            if pool.availability_zone not in self.availability_zones:
                raise ValueError(
                    f"gpu_pools[{i}].availability_zone: {pool.availability_zone} not in availability_zones"
                )
        names = [p.name for p in self.gpu_pools]
        if len(set(names)) != len(names):
            raise ValueError("gpu_pools: pool names must be unique")
        return self


class Model(Strict):
    name: str  # Hugging Face repository id
    s3_prefix: str  # under the model bucket
    local_path: str  # on-node NVMe, where the runtime loads from
    dtype: Literal["bfloat16", "float16"] = "bfloat16"
    edge_name: str  # the small model the Jetson devices serve
    edge_max_model_len: int = Field(default=4096, ge=256)


class Fsx(Strict):
    storage_capacity_gib: int = Field(ge=1200)
    per_unit_storage_throughput: Literal[125, 250, 500, 1000] = 250

    @field_validator("storage_capacity_gib")
    @classmethod
    def _increment(cls, value: int) -> int:
        if value % 2400 and value != 1200:  # PERSISTENT_2 sizes: 1.2 TiB, then multiples of 2.4 TiB
            raise ValueError("must be 1200 or a multiple of 2400 GiB")
        return value


class WarmCache(Strict):
    ebs_volume_gib: int = Field(ge=100)
    ebs_iops: int = Field(default=16000, ge=3000, le=16000)
    ebs_throughput_mibps: int = Field(default=1000, ge=125, le=1000)


class ColdTier(Strict):
    infrequent_access_days: int = Field(default=30, ge=30)
    glacier_days: int = Field(default=90)
    expire_days: int = Field(default=365)
    noncurrent_expire_days: int = Field(default=30, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ColdTier:
        if not self.infrequent_access_days < self.glacier_days < self.expire_days:
            raise ValueError("glacier_days: need infrequent_access_days < glacier_days < expire_days")
        return self


class Storage(Strict):
    fsx: Fsx
    warm_cache: WarmCache
    cold: ColdTier = ColdTier()


class Resources(Strict):
    """Per-pod requests/limits. GPUs are an extended resource: request == limit."""

    gpus: int = Field(ge=1, le=8)
    cpu_request: int = Field(ge=1)
    cpu_limit: int = Field(ge=1)
    memory_request_gib: int = Field(ge=1)
    memory_limit_gib: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Resources:
        if self.cpu_request > self.cpu_limit:
            raise ValueError(f"cpu_request: {self.cpu_request} > cpu_limit ({self.cpu_limit})")
        if self.memory_request_gib > self.memory_limit_gib:
            raise ValueError(
                f"memory_request_gib: {self.memory_request_gib} > memory_limit_gib ({self.memory_limit_gib})"
            )
        return self


class WorkloadSecurity(Strict):
    """Kubernetes Secrets the runtime mounts read-only (made outside Pulumi, e.g. by cert-manager and the External
    Secrets Operator from Vault/KMS, so no key material passes through the stack's config or state)."""

    # kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt: HTTPS (TLS 1.3 only) on the Service and the pod
    tls_secret: str | None = None
    # Secret with jwks.json and policy.yaml: JWT authentication and the RBAC/ABAC policy
    auth_secret: str | None = None
    issuer: str | None = None
    audience: str | None = None
    # Secret with weights.key: the data key of an encrypted model directory
    weights_key_secret: str | None = None
    # The audit log on the pod's emptyDir: the runtime rotates it at this size (audit.max_bytes) and keeps
    # deepfleet.defaults.AUDIT_BACKUPS rotated files, so the emptyDir's sizeLimit is never reached (eviction)
    audit_max_mib: int = Field(default=64, ge=1, le=4096)

    @model_validator(mode="after")
    def _issuer_needs_auth(self) -> WorkloadSecurity:
        if (self.issuer or self.audience) and not self.auth_secret:
            raise ValueError("issuer/audience: set auth_secret too (the JWKS and policy they belong to)")
        return self


class Workload(Strict):
    # The pods run <image_registry>/deepfleet.defaults.IMAGE_REPOSITORY:<runtime version>, the name and tag
    # scripts/build-image.sh gives its build (push it there).
    image_registry: str = Field(default="ghcr.io", pattern=r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$")
    namespace: str = "deepfleet"
    resources: Resources
    # Without an aws section the workload goes to this kubeconfig context (e.g. an on-prem cluster).
    kubeconfig_context: str | None = None
    # On-prem clusters: what advertises nvidia.com/gpu. device_plugin: NVIDIA's device plugin with GPU feature
    # discovery (the driver and container toolkit come from Ansible); gpu_operator: NVIDIA's GPU Operator
    # (device plugin, GFD, DCGM, MIG manager) with its driver and toolkit containers off for the same reason.
    gpu_stack: Literal["device_plugin", "gpu_operator"] = "device_plugin"
    # On-prem clusters whose GPU hosts roles/nvidia_mig partitions alike (nvidia_mig_layout): single advertises
    # each MIG device as one nvidia.com/gpu. MIG devices have no NCCL path to each other, so one per pod.
    # ("mixed", per-profile resource names, is not offered: the pod would have to name a profile.)
    mig_strategy: Literal["none", "single"] = "none"
    security: WorkloadSecurity = WorkloadSecurity()

    @property
    def image(self) -> str:
        return f"{self.image_registry}/{IMAGE_REPOSITORY}:{deepfleet.__version__}"

    @model_validator(mode="after")
    def _mig(self) -> Workload:
        if self.mig_strategy == "single" and self.resources.gpus != 1:
            raise ValueError(
                f"resources.gpus: {self.resources.gpus} with mig_strategy single: a pod gets one MIG device (MIG "
                "devices cannot run tensor parallelism together: NCCL has no path between them)"
            )
        return self


class Autoscaling(Strict):
    latency_target_ms: int = Field(default=80, ge=1)
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=10, ge=1)
    gpu_utilization_target_percent: int = Field(default=85, ge=1, le=100)
    scale_down_cooldown_s: int = Field(default=300, ge=0)
    queue_length_target: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} > max_replicas ({self.max_replicas})")
        return self


class Networks(Strict):
    allowed: list[Cidr] = Field(min_length=1)  # who may reach the API and SSH; never 0.0.0.0/0
    # Who may reach the load balancers' client ports (Ansible: hardening_client_networks). Each entry is checked
    # on its own, so an error names its index. Without it: StackConfig.client_networks (the declared networks).
    clients: list[Annotated[Cidr, AfterValidator(_check_cidr)]] | None = Field(default=None, min_length=1)

    @field_validator("allowed")
    @classmethod
    def _not_open(cls, values: list[str]) -> list[str]:
        for v in values:
            if _network(_check_cidr(v)).prefixlen == 0:
                raise ValueError(f"{v} opens the API/SSH to the world; list the client networks")
        return values


# The RoCE fabric's defaults are the rdma_roce role's (one source): the stack renders what it overrides.
_ROCE = yaml.safe_load((ROOT / "roles" / "rdma_roce" / "defaults" / "main.yml").read_text())


class RoceFabric(Strict):
    mtu: int = Field(default=_ROCE["rdma_roce_mtu"], ge=1500, le=9216)  # 9000 gives RoCE a 4096-byte path MTU
    pfc_priority: int = Field(default=_ROCE["rdma_roce_priority"], ge=0, le=7)  # lossless class for RoCEv2
    dscp: int = Field(default=_ROCE["rdma_roce_dscp"], ge=0, le=63)
    # DCQCN congestion notification packets: their own class, never stuck behind the RoCE data they slow down
    cnp_dscp: int = Field(default=_ROCE["rdma_roce_cnp_dscp"], ge=0, le=63)
    cnp_priority: int = Field(default=_ROCE["rdma_roce_cnp_priority"], ge=0, le=7)
    max_latency_us: int = Field(default=_ROCE["rdma_roce_validate_max_latency_us"], ge=1)  # the documents: 50
    gid_index: int = Field(default=_ROCE["rdma_roce_gid_index"], ge=0)

    @model_validator(mode="after")
    def _separate_classes(self) -> RoceFabric:
        if self.cnp_dscp == self.dscp or self.cnp_priority == self.pfc_priority:
            raise ValueError(
                f"cnp_dscp/cnp_priority ({self.cnp_dscp}/{self.cnp_priority}) must differ from the lossless "
                f"class dscp/pfc_priority ({self.dscp}/{self.pfc_priority})"
            )
        return self


class RoceNic(Strict):
    netdev: str  # the Ethernet interface (e.g. ens1f0np0): the rdma_roce role configures it
    hca: str  # its RDMA device (e.g. mlx5_0): NCCL_IB_HCA


class OnpremHost(Strict):
    name: str = Field(pattern=r"^[a-z0-9-]+$")
    address: str
    gpu_model: str
    gpus: int = Field(ge=1, le=16)
    roce_nics: list[RoceNic] = Field(default_factory=list)

    @field_validator("gpu_model")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in gpu_catalog.GPU_MODELS:
            raise ValueError(f"unknown GPU type {value!r} (known: {', '.join(sorted(gpu_catalog.GPU_MODELS))})")
        return value


class ObjectStore(Strict):
    """An S3-compatible store as rclone reaches it. Credentials never sit in the stack config: the rendered
    inventory refers to vault-encrypted variables (vault_model_store_<name>_access_key_id / _secret_access_key)."""

    provider: Literal["AWS", "Alibaba", "Ceph", "Minio", "Other"] = "AWS"
    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    region: str = "us-east-1"
    endpoint: str | None = None  # None: the provider's own (AWS S3)


class ModelStore(Strict):
    """Where the on-prem hosts get the model (roles/model_store): origin/<model.s3_prefix>/<revision>."""

    origin: ObjectStore
    revision: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    cache_host: str | None = None  # an onprem host: the site cache on its warm tier
    mirror: ObjectStore | None = None  # kept equal to origin by a sync timer (e.g. the cloud's model bucket)
    sync_on_calendar: str = "hourly"


class Onprem(Strict):
    network_cidr: Cidr
    ssh_user: str = "deepfleet"
    fabric: RoceFabric = RoceFabric()
    hosts: list[OnpremHost] = Field(min_length=1)
    model_store: ModelStore | None = None

    _cidr = field_validator("network_cidr")(_check_cidr)

    @model_validator(mode="after")
    def _inside(self) -> Onprem:
        net = _network(self.network_cidr)
        for i, h in enumerate(self.hosts):
            if ipaddress.ip_address(h.address) not in net:
                raise ValueError(f"hosts[{i}].address: {h.address} is not in network_cidr {self.network_cidr}")
        cache = self.model_store.cache_host if self.model_store else None
        if cache is not None and cache not in {h.name for h in self.hosts}:
            raise ValueError(f"model_store.cache_host: {cache} is not one of hosts[].name")
        return self


class EdgeDevice(Strict):
    name: str = Field(pattern=r"^[a-z0-9-]+$")
    address: str
    device: str

    @field_validator("device")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in gpu_catalog.EDGE_DEVICES:
            raise ValueError(f"unknown edge device {value!r} (known: {', '.join(sorted(gpu_catalog.EDGE_DEVICES))})")
        return value


class Edge(Strict):
    network_cidr: Cidr
    devices: list[EdgeDevice] = Field(min_length=1)

    _cidr = field_validator("network_cidr")(_check_cidr)


class Routing(Strict):
    switchover_ms: int = Field(default=100, ge=10, le=10000)
    listen_port: int = Field(default=8080, ge=1, le=65535)


class StackConfig(Strict):
    model: Model
    networks: Networks
    workload: Workload | None = None
    autoscaling: Autoscaling = Autoscaling()
    aws: Aws | None = None
    storage: Storage | None = None
    onprem: Onprem | None = None
    edge: Edge | None = None
    routing: Routing | None = None

    @model_validator(mode="after")
    def _consistent(self) -> StackConfig:
        if self.aws and not self.storage:
            raise ValueError("storage: required when aws is set (FSx hot tier, warm cache, S3 cold tier)")
        if self.workload and not (self.aws or self.workload.kubeconfig_context):
            raise ValueError("workload.kubeconfig_context: required without an aws section (no EKS to deploy to)")
        if self.aws and self.workload and self.workload.mig_strategy != "none":
            raise ValueError(
                "workload.mig_strategy: EKS GPU nodes are not MIG-partitioned by this stack (roles/nvidia_mig "
                "partitions on-prem hosts): leave it none with an aws section"
            )
        if self.aws and self.workload:
            per_node = min(p.spec.gpus for p in self.aws.gpu_pools)
            if self.workload.resources.gpus > per_node:
                raise ValueError(f"workload.resources.gpus: {self.workload.resources.gpus} > {per_node} GPUs per node")
        if self.routing and not (self.onprem and self.workload):
            raise ValueError("routing: needs onprem hosts (served first) and a workload (the cluster it runs in)")
        for (key_a, a), (key_b, b) in combinations(self.site_networks, 2):
            if _network(a).overlaps(_network(b)):
                raise ValueError(f"{key_b}: {b} overlaps {key_a} {a} (hybrid routing needs disjoint networks)")
        return self

    @property
    def site_networks(self) -> list[tuple[str, Cidr]]:
        """(key, CIDR) of the networks the stack's own sites live in: cloud VPC, on-prem hosts, edge devices."""
        networks = [("aws.vpc_cidr", self.aws.vpc_cidr)] if self.aws else []
        networks += [("onprem.network_cidr", self.onprem.network_cidr)] if self.onprem else []
        networks += [("edge.network_cidr", self.edge.network_cidr)] if self.edge else []
        return networks

    @property
    def client_networks(self) -> list[Cidr]:
        """Who may reach the load balancers' client ports: `networks.clients` where declared, else the networks
        the stack declares anyway (networks.allowed, then its sites' networks), without duplicates. Never the
        world by default: 0.0.0.0/0 gets there only written out in `networks.clients`."""
        if self.networks.clients is not None:
            return list(self.networks.clients)
        declared = [*self.networks.allowed, *(cidr for _, cidr in self.site_networks)]
        return list(dict.fromkeys(declared))


_SUBKEY = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*): ")


def _key(loc: tuple[Any, ...]) -> str:
    key = NAMESPACE + ":"
    for i, part in enumerate(loc):
        key += f"[{part}]" if isinstance(part, int) else ("" if i == 0 else ".") + str(part)
    return key


def parse(raw: Mapping[str, Any]) -> StackConfig:
    """Validate a stack's config (keys without the `deepfleet:` prefix) or raise ConfigError naming the keys."""
    try:
        return StackConfig.model_validate(dict(raw))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = "required key missing" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
            key = _key(err["loc"])
            # Cross-field checks start their message with the sub-key they blame: fold it into the key.
            if sub := _SUBKEY.match(msg):
                key += ("." if err["loc"] else "") + sub[1]
                msg = msg[sub.end() :]
            lines.append(f"{key}: {msg}")
        raise ConfigError("invalid stack config:\n  " + "\n  ".join(lines)) from None


def stack_file(stack: str) -> Path:
    return ROOT / f"Pulumi.{stack}.yaml"


def read_stack_file(stack: str) -> dict[str, Any]:
    """The `config:` of Pulumi.<stack>.yaml with the `deepfleet:` prefix stripped."""
    path = stack_file(stack)
    if not path.is_file():
        raise ConfigError(f"no stack file {path.name}")
    raw = yaml.safe_load(path.read_text()).get("config", {})
    foreign = [k for k in raw if not k.startswith(NAMESPACE + ":")]
    if foreign:
        raise ConfigError(f"{path.name}: keys outside the {NAMESPACE}: namespace: {', '.join(foreign)}")
    return {k.split(":", 1)[1]: v for k, v in raw.items()}


def from_pulumi() -> StackConfig:
    """The running stack's config, as `pulumi up` (or the mocks) provide it."""
    cfg = pulumi.Config(NAMESPACE)
    raw = {name: cfg.get_object(name) for name in StackConfig.model_fields}
    # pulumi.Config reads keys by name only; list the stack's keys too so a misspelled top-level key fails.
    keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    unknown = sorted(k for k in keys if k.startswith(NAMESPACE + ":") and k.split(":", 1)[1] not in raw)
    if unknown:
        raise ConfigError("invalid stack config:\n  " + "\n  ".join(f"{k}: unknown key" for k in unknown))
    return parse({k: v for k, v in raw.items() if v is not None})
