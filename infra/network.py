"""AWS network for GPU capacity: a VPC whose nodes live in private subnets, one NAT gateway for egress
(container images from public registries), and VPC endpoints so ECR, STS, EC2, logs and S3 traffic stays
inside AWS."""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra.config import Aws

# Interface endpoints EKS nodes need to pull from ECR and join the cluster without the internet.
INTERFACE_ENDPOINTS = ("ecr.api", "ecr.dkr", "sts", "ec2", "logs")


class Network(pulumi.ComponentResource):
    vpc: aws.ec2.Vpc
    private_subnets: dict[str, aws.ec2.Subnet]  # by availability zone

    def __init__(self, name: str, cfg: Aws, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("deepfleet:aws:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = {"Name": name, "project": "deepfleet"}
        self.vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=cfg.vpc_cidr,
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags=tags,
            opts=child,
        )
        igw = aws.ec2.InternetGateway(f"{name}-igw", vpc_id=self.vpc.id, tags=tags, opts=child)
        public = [
            aws.ec2.Subnet(
                f"{name}-public-{i}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                map_public_ip_on_launch=False,
                tags={**tags, "kubernetes.io/role/elb": "1"},
                opts=child,
            )
            for i, (cidr, az) in enumerate(zip(cfg.public_subnet_cidrs, cfg.availability_zones, strict=False))
        ]
        public_rt = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=self.vpc.id,
            routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": igw.id}],
            tags=tags,
            opts=child,
        )
        for i, subnet in enumerate(public):
            aws.ec2.RouteTableAssociation(
                f"{name}-public-rta-{i}", subnet_id=subnet.id, route_table_id=public_rt.id, opts=child
            )
        eip = aws.ec2.Eip(f"{name}-nat-eip", domain="vpc", tags=tags, opts=child)
        nat = aws.ec2.NatGateway(
            f"{name}-nat",
            allocation_id=eip.id,
            subnet_id=public[0].id,
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[igw]),
        )
        private_rt = aws.ec2.RouteTable(
            f"{name}-private-rt",
            vpc_id=self.vpc.id,
            routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
            tags=tags,
            opts=child,
        )
        self.private_subnets = {}
        for i, (cidr, az) in enumerate(zip(cfg.private_subnet_cidrs, cfg.availability_zones, strict=True)):
            subnet = aws.ec2.Subnet(
                f"{name}-private-{i}",
                vpc_id=self.vpc.id,
                cidr_block=cidr,
                availability_zone=az,
                tags={**tags, "kubernetes.io/role/internal-elb": "1"},
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-rta-{i}", subnet_id=subnet.id, route_table_id=private_rt.id, opts=child
            )
            self.private_subnets[az] = subnet

        endpoint_sg = aws.ec2.SecurityGroup(
            f"{name}-endpoints",
            vpc_id=self.vpc.id,
            description="HTTPS from the VPC to interface endpoints",
            ingress=[{"protocol": "tcp", "from_port": 443, "to_port": 443, "cidr_blocks": [cfg.vpc_cidr]}],
            tags=tags,
            opts=child,
        )
        aws.ec2.VpcEndpoint(
            f"{name}-s3",
            vpc_id=self.vpc.id,
            service_name=f"com.amazonaws.{cfg.region}.s3",
            vpc_endpoint_type="Gateway",
            route_table_ids=[private_rt.id],
            tags=tags,
            opts=child,
        )
        for service in INTERFACE_ENDPOINTS:
            aws.ec2.VpcEndpoint(
                f"{name}-{service.replace('.', '-')}",
                vpc_id=self.vpc.id,
                service_name=f"com.amazonaws.{cfg.region}.{service}",
                vpc_endpoint_type="Interface",
                private_dns_enabled=True,
                subnet_ids=[s.id for s in self.private_subnets.values()],
                security_group_ids=[endpoint_sg.id],
                tags=tags,
                opts=child,
            )
        self.register_outputs({"vpc_id": self.vpc.id})
