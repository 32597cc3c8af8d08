"""Storage tiers and the model-weight flow S3 → FSx for Lustre → local NVMe.

- cold: S3 — the model bucket (source of truth for weights, versioned; superseded versions age to Glacier)
  and the archive bucket (logs/, checkpoints/: Standard → Standard-IA → Glacier → expiry);
- hot: FSx for Lustre linked to the model bucket's prefix (lazy-loads objects on first read, re-imports
  on change), mounted by every GPU pod read-only;
- warm: the node's instance-store NVMe (RAID0 via nodeadm, the pods' emptyDir); the pod's `stage-weights` init
  container copies FSx → NVMe, and the runtime mmaps the weights from NVMe. The GPU nodes' gp3 root volume
  (size/IOPS/throughput from `storage.warm_cache`) holds the multi-GB CUDA images and is the emptyDir's home on
  an instance type without instance store.
Everything is encrypted with one customer-managed KMS key."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.config import Model, Storage

FSX_MOUNT = "/fsx"  # where the FSx file system appears inside the stage-weights init container
FSX_MODELS_PATH = "/models"  # the FSx directory linked to s3://<model bucket>/models/
LUSTRE_PORTS = ((988, 988), (1018, 1023))  # Lustre client/server traffic (FSx docs)
ROOT_DEVICE = "/dev/xvda"  # AL2023 EKS AMIs


@dataclass(frozen=True)
class WeightFlow:
    """Where the weights are at each tier; exported, and read by the k8s workload."""

    s3_uri: pulumi.Output[str]
    fsx_file_system_id: pulumi.Output[str]
    fsx_dns_name: pulumi.Output[str]
    fsx_mount_name: pulumi.Output[str]
    fsx_path: str  # inside the FSx mount
    nvme_path: str  # on the node-local NVMe, what the runtime loads


class StorageTiers(pulumi.ComponentResource):
    def __init__(
        self,
        name: str,
        cfg: Storage,
        model: Model,
        vpc_id: pulumi.Input[str],
        vpc_cidr: str,
        subnet_id: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("deepfleet:aws:StorageTiers", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        identity = aws.get_caller_identity_output(opts=pulumi.InvokeOptions(parent=self))
        self.kms_key = aws.kms.Key(
            f"{name}-kms",
            description="deepfleet: EBS, S3, FSx and EKS secrets",
            enable_key_rotation=True,
            deletion_window_in_days=30,
            policy=identity.account_id.apply(
                lambda acct: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Sid": "AccountAdmin",
                                "Effect": "Allow",
                                "Principal": {"AWS": f"arn:aws:iam::{acct}:root"},
                                "Action": "kms:*",
                                "Resource": "*",
                            }
                        ],
                    }
                )
            ),
            opts=child,
        )
        self.model_bucket = self._bucket(f"{name}-models")
        # Superseded weights (noncurrent versions) age out to Glacier, then expire; current ones stay hot.
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-models-noncurrent",
            bucket=self.model_bucket.id,
            rules=[
                {
                    "id": "noncurrent-to-glacier",
                    "status": "Enabled",
                    "filter": {},
                    "noncurrent_version_transitions": [
                        {"noncurrent_days": cfg.cold.glacier_days, "storage_class": "GLACIER"}
                    ],
                    "noncurrent_version_expiration": {"noncurrent_days": cfg.cold.expire_days},
                }
            ],
            opts=child,
        )
        self.archive_bucket = self._bucket(f"{name}-archive")
        aws.s3.BucketLifecycleConfiguration(
            f"{name}-archive-tiering",
            bucket=self.archive_bucket.id,
            rules=[
                {
                    "id": f"{prefix.rstrip('/')}-tiering",
                    "status": "Enabled",
                    "filter": {"prefix": prefix},
                    "transitions": [
                        {"days": cfg.cold.infrequent_access_days, "storage_class": "STANDARD_IA"},
                        {"days": cfg.cold.glacier_days, "storage_class": "GLACIER"},
                    ],
                    "expiration": {"days": cfg.cold.expire_days},
                    "noncurrent_version_expiration": {"noncurrent_days": cfg.cold.noncurrent_expire_days},
                }
                for prefix in ("logs/", "checkpoints/")
            ],
            opts=child,
        )

        fsx_sg = aws.ec2.SecurityGroup(
            f"{name}-fsx",
            vpc_id=vpc_id,
            description="Lustre from the VPC",
            ingress=[
                {"protocol": "tcp", "from_port": lo, "to_port": hi, "cidr_blocks": [vpc_cidr]}
                for lo, hi in LUSTRE_PORTS
            ],
            egress=[
                {"protocol": "tcp", "from_port": lo, "to_port": hi, "cidr_blocks": [vpc_cidr]}
                for lo, hi in LUSTRE_PORTS
            ],
            opts=child,
        )
        self.fsx = aws.fsx.LustreFileSystem(
            f"{name}-fsx",
            deployment_type="PERSISTENT_2",
            storage_type="SSD",
            storage_capacity=cfg.fsx.storage_capacity_gib,
            per_unit_storage_throughput=cfg.fsx.per_unit_storage_throughput,
            subnet_ids=subnet_id,
            security_group_ids=[fsx_sg.id],
            kms_key_id=self.kms_key.arn,
            data_compression_type="LZ4",
            file_system_type_version="2.15",
            opts=child,
        )
        aws.fsx.DataRepositoryAssociation(
            f"{name}-fsx-models",
            file_system_id=self.fsx.id,
            file_system_path=FSX_MODELS_PATH,
            data_repository_path=self.model_bucket.bucket.apply(lambda b: f"s3://{b}/models/"),
            batch_import_meta_data_on_create=True,
            s3={"auto_import_policy": {"events": ["NEW", "CHANGED", "DELETED"]}},
            opts=child,
        )
        prefix = model.s3_prefix.removeprefix("models/").strip("/")
        self.weight_flow = WeightFlow(
            s3_uri=self.model_bucket.bucket.apply(lambda b: f"s3://{b}/models/{prefix}/"),
            fsx_file_system_id=self.fsx.id,
            fsx_dns_name=self.fsx.dns_name,
            fsx_mount_name=self.fsx.mount_name,
            fsx_path=f"{FSX_MODELS_PATH}/{prefix}",
            nvme_path=model.local_path,
        )
        self.register_outputs({"model_bucket": self.model_bucket.bucket, "fsx": self.fsx.id})

    def _bucket(self, name: str) -> aws.s3.Bucket:
        child = pulumi.ResourceOptions(parent=self)
        bucket = aws.s3.Bucket(name, force_destroy=False, tags={"project": "deepfleet"}, opts=child)
        aws.s3.BucketPublicAccessBlock(
            f"{name}-public-access",
            bucket=bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=child,
        )
        aws.s3.BucketOwnershipControls(
            f"{name}-ownership", bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"}, opts=child
        )
        aws.s3.BucketVersioning(
            f"{name}-versioning", bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=child
        )
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{name}-sse",
            bucket=bucket.id,
            rules=[
                {
                    "apply_server_side_encryption_by_default": {
                        "sse_algorithm": "aws:kms",
                        "kms_master_key_id": self.kms_key.arn,
                    },
                    "bucket_key_enabled": True,
                }
            ],
            opts=child,
        )
        aws.s3.BucketPolicy(
            f"{name}-tls-only",
            bucket=bucket.id,
            policy=bucket.arn.apply(
                lambda arn: json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Sid": "DenyInsecureTransport",
                                "Effect": "Deny",
                                "Principal": "*",
                                "Action": "s3:*",
                                "Resource": [arn, f"{arn}/*"],
                                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                            }
                        ],
                    }
                )
            ),
            opts=child,
        )
        return bucket


def warm_cache_block_device(cfg: Storage, kms_key_arn: pulumi.Input[str]) -> dict:
    """The GPU node's gp3 root volume, sized and provisioned as the warm tier's EBS part."""
    return {
        "device_name": ROOT_DEVICE,
        "ebs": {
            "volume_type": "gp3",
            "volume_size": cfg.warm_cache.ebs_volume_gib,
            "iops": cfg.warm_cache.ebs_iops,
            "throughput": cfg.warm_cache.ebs_throughput_mibps,
            "encrypted": "true",
            "kms_key_id": kms_key_arn,
            "delete_on_termination": "true",
        },
    }
