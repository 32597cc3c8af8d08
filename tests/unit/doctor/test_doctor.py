"""deepfleet doctor against canned nvidia-smi outputs (a fake probe), real files and a loopback HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfleet.cli import app
from deepfleet.doctor import gpu, nccl, node
from deepfleet.doctor.diagnose import Options, diagnose, exit_code
from deepfleet.doctor.matrix import find_roles_dir, load_matrix
from deepfleet.doctor.probe import Probe, Result
from deepfleet.security.manifest import write_manifest

ROLES = Path(__file__).resolve().parents[3] / "roles"
SMI_CSV = "0, NVIDIA H200, {drv}, {pm}, Enabled, {unc}, {cor}, 143771\n"
SMI_HEADER = "| NVIDIA-SMI {drv}    Driver Version: {drv}    CUDA Version: {cuda}   |\n"


class FakeProbe(Probe):
    def __init__(self, gpu=True, drv="535.230.02", cuda="12.2", pm="Enabled", unc="0", cor="0", fabric="N/A",
                 kernel_log="", http=None):
        self.gpu, self.kw = gpu, dict(drv=drv, cuda=cuda, pm=pm, unc=unc, cor=cor)
        self.fabric, self.kernel_log, self.http = fabric, kernel_log, http or {}

    def which(self, program):
        return f"/usr/bin/{program}" if program != "nvidia-smi" or self.gpu else None

    def run(self, argv, timeout=20):
        if argv[0] == "nvidia-smi":
            if any(a.startswith("--query-gpu") for a in argv):
                return Result(0, SMI_CSV.format(**self.kw))
            if "-q" in argv:
                return Result(0, f"GPU 00000000:01:00.0\n    Fabric\n        State : {self.fabric}\n"
                                 f"        Status : {'Success' if self.fabric == 'Completed' else 'N/A'}\n")
            if any(a.startswith("--query-remapped-rows") for a in argv):
                return Result(0, "00000000:01:00.0, No, No\n")
            return Result(0, SMI_HEADER.format(**self.kw))
        if argv[0] == "journalctl":
            return Result(0 if self.kernel_log else 1, self.kernel_log)
        if argv[0] == "timedatectl":
            return Result(0, "yes\n")
        return Result(127, "", "not installed")

    def http_get(self, url, timeout=3):
        return self.http.get(url.rsplit("/", 1)[1], (None, "refused"))


@pytest.fixture(scope="module")
def matrix():
    return load_matrix(ROLES)


def test_matrix_read_from_the_roles(matrix):
    import yaml
    drv = yaml.safe_load((ROLES / "nvidia_driver/defaults/main.yml").read_text())["nvidia_driver_branch"]
    cuda = yaml.safe_load((ROLES / "cuda/defaults/main.yml").read_text())
    assert matrix.driver_branch == str(drv) and matrix.cuda_version == str(cuda["cuda_version"])
    assert matrix.cuda_min_driver[matrix.cuda_version] == cuda["cuda_matrix"][matrix.cuda_version]["min_driver"]
    assert find_roles_dir() == ROLES


def test_driver_on_pinned_branch_ok(matrix):
    probe = FakeProbe(drv=f"{matrix.driver_branch}.230.02", cuda="12.2")
    checks = gpu.versions(probe, gpu.list_gpus(probe)[0], matrix)
    assert [c.status for c in checks] == ["ok", "ok", "ok"]


def test_newer_driver_warns_older_fails(matrix):
    need = matrix.cuda_min_driver[matrix.cuda_version]
    newer = str(max(int(matrix.driver_branch), need) + 45)
    probe = FakeProbe(drv=f"{newer}.10", cuda="13.0")
    branch = gpu.versions(probe, gpu.list_gpus(probe)[0], matrix)[1]
    assert branch.status == "warn" and f'nvidia_driver_branch: "{newer}"' in branch.fix
    probe = FakeProbe(drv=f"{need - 1}.10", cuda="11.0")
    checks = gpu.versions(probe, gpu.list_gpus(probe)[0], matrix)
    assert [c.status for c in checks[1:]] == ["fail", "fail"]


def test_persistence_ecc_fabric_xid():
    probe = FakeProbe(pm="Disabled", unc="2", fabric="In Progress",
                      kernel_log="NVRM: Xid (PCI:0000:01:00): 79, pid=0, GPU has fallen off the bus.\n")
    gpus = gpu.list_gpus(probe)[0]
    assert gpu.persistence(gpus).status == "warn"
    assert gpu.ecc(probe, gpus)[0].status == "fail"
    assert gpu.fabric_manager(probe, gpus).status == "fail"
    x = gpu.xid(probe)
    assert x.status == "fail" and "fell off the bus" in x.detail
    ok = FakeProbe(fabric="Completed")
    assert gpu.fabric_manager(ok, gpu.list_gpus(ok)[0]).status == "ok"
    assert gpu.xid(ok).status == "ok"


def test_no_gpu_says_so_and_checks_the_rest(tmp_path):
    probe = FakeProbe(gpu=False, http={"healthz": (200, '{"status":"ok"}'), "readyz": (200, '{"status":"ready"}')})
    checks = diagnose(Options(model_dir=tmp_path, nccl_tests=False), probe)
    dev = next(c for c in checks if c.name == "devices")
    assert dev.status == "warn" and "no GPU: nvidia-smi is not installed" in dev.detail
    assert {c.area for c in checks} >= {"storage", "weights", "permissions", "ports", "clock", "runtime"}
    required = diagnose(Options(model_dir=tmp_path, require_gpu=True, nccl_tests=False), probe)
    assert next(c for c in required if c.name == "devices").status == "fail" and exit_code(required) == 1


def test_weights_manifest_and_permissions(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 100)
    assert node.weights(model).status == "warn"  # no manifest yet
    write_manifest(model)
    assert node.weights(model).status == "ok"
    (model / "model.safetensors").write_bytes(b"y" * 100)
    bad = node.weights(model)
    assert bad.status == "fail" and "sha256 mismatch" in bad.detail
    assert node.permissions(model).status == "ok"
    (model / "config.json").chmod(0o666)
    perm = node.permissions(model)
    assert perm.status == "fail" and "world-writable" in perm.detail


def test_storage_tiers(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 25 8:1 / {tmp_path} rw,noatime - xfs /dev/loop1 rw\n")
    checks = node.storage({"hot": str(tmp_path), "cold": str(tmp_path / "absent")}, mountinfo)
    assert checks[0].status in ("ok", "warn") and "xfs mount" in checks[0].detail
    assert checks[1].status == "warn" and checks[1].detail == "absent"
    (tmp_path / "sub").mkdir()
    sub = node.storage({"warm": str(tmp_path / "sub")}, mountinfo)[0]
    assert sub.status == "warn" and "not a mount point" in sub.detail


def test_nccl_environment(tmp_path):
    conf = tmp_path / "nccl.conf"
    conf.write_text("NCCL_DEBUG=WARN\n")
    net = tmp_path / "net"
    (net / "eth0").mkdir(parents=True)
    checks = nccl.environment({"NCCL_SOCKET_IFNAME": "eth0"}, conf, net, tmp_path / "ib")
    assert [c.status for c in checks] == ["ok"] and "NCCL_DEBUG=WARN" in checks[0].detail
    checks = nccl.environment({"NCCL_SOCKET_IFNAME": "bond7", "NCCL_IB_HCA": "mlx5_0"}, conf, net, tmp_path / "ib")
    assert [c.status for c in checks] == ["ok", "fail", "fail"]


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        code, body = (200, {"status": "ok"}) if self.path == "/healthz" else (503, {"status": "warming_up"})
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_runtime_health_and_ports_on_loopback():
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        health, ready = node.runtime_health(Probe(), port)
        assert health.status == "ok" and ready.status == "warn" and "warming_up" in ready.detail
        assert node.ports({"runtime API": port})[0].status == "ok"
    finally:
        server.shutdown()
        server.server_close()
    assert node.ports({"runtime API": port})[0].status == "fail"


def test_cli_exit_code_and_json(tmp_path):
    res = CliRunner().invoke(app, ["doctor", "--json", "--model", str(tmp_path), "--port", "1", "--no-nccl-tests"])
    assert res.exit_code == 1  # nothing listens on port 1
    report = json.loads(res.output)
    assert report["summary"]["fail"] >= 1
    assert any(c["area"] == "runtime" and c["status"] == "fail" for c in report["checks"])
