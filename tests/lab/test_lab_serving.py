"""Lab end-to-end for serving: HAProxy on the load balancer in front of the runtime hosts serving a tiny
model, with everything on (TLS 1.3 on both hops, JWT + policy, audit log: lab/pki.py). A completion with a
token goes through it, one without is refused and audited with the client's address; requests keep
succeeding while a runtime host is stopped and while a model revision switch restarts every host one by
one; Prometheus scrapes the runtime targets over TLS."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from lab import objectstore

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

MODEL = objectstore.MODEL  # the lab's model (roles/inference_runtime: inference_runtime_model_name)
MODEL_ROOT = f"/models/{MODEL}"  # roles/inference_runtime: inference_runtime_model_root
API_PORT = 8000  # playbooks/group_vars/all: deepfleet_api_port
LB_TLS_PORT = 8443  # roles/loadbalancer: loadbalancer_tls_port (the lab serves TLS only: loadbalancer_http false)
CA_FILE = "/etc/ssl/certs/deepfleet-ca.pem"  # playbooks/group_vars/all: deepfleet_ca_file
AUDIT_LOG = "/var/log/deepfleet-audit/audit.jsonl"  # roles/inference_runtime: inference_runtime_audit_path
BACKEND = "deepfleet_runtime"  # playbooks/group_vars/all: deepfleet_lb_backend
ADMIN_SOCKET = "/run/haproxy/admin.sock"  # playbooks/group_vars/all: deepfleet_lb_admin_socket
BODY = json.dumps({"model": MODEL, "prompt": "The fleet", "max_tokens": 4, "temperature": 0})


def lb_host(lab):
    return lab.hosts[0]  # lab inventory: lab-1 is the load balancer and the monitoring host


def client(lab):
    return lab.hosts[-1]  # requests come from another lab host, over the lab network


def token(lab, role: str = "lab_load") -> str:
    """A token lab/pki.py signed for `role` (lab_load: the policy's rate limit for request loops)."""
    return (Path(lab.state.state_dir) / "pki" / "tokens" / f"{role}.jwt").read_text().strip()


def curl_completion(lab, role: str | None = "lab_load") -> str:
    url = f"https://{lb_host(lab).ip}:{LB_TLS_PORT}/v1/completions"
    auth = f"-H {shlex.quote('Authorization: Bearer ' + token(lab, role))} " if role else ""
    return (f"curl -sS -m 60 --tlsv1.3 --cacert {CA_FILE} {auth}-H 'Content-Type: application/json' "
            f"-d {shlex.quote(BODY)} {url}")


def haproxy_status(lab) -> dict[str, str]:
    out = lab.ssh(lb_host(lab), f"echo 'show stat' | socat stdio unix-connect:{ADMIN_SOCKET}").stdout
    rows = [r.split(",") for r in out.splitlines() if r.startswith(BACKEND + ",")]
    return {r[1]: r[17] for r in rows if r[1] not in ("BACKEND", "FRONTEND")}


def wait_all_up(lab, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = haproxy_status(lab)
        if status and all(s == "UP" for s in status.values()):
            return
        time.sleep(1)
    pytest.fail(f"runtime hosts not all UP in HAProxy after {timeout} s: {haproxy_status(lab)}")


class RequestLoop:
    """Sequential completions through the load balancer from a lab host, recording each HTTP status."""

    def __init__(self, lab):
        self.lab, self.host = lab, client(lab)

    def __enter__(self):
        request = f"{curl_completion(self.lab)} -o /dev/null -w '%{{http_code}}\\n' >> /tmp/lb-codes"
        loop = f"while [ ! -e /tmp/lb-stop ]; do {request}; sleep 0.2; done"
        cmd = (
            f"rm -f /tmp/lb-codes /tmp/lb-stop; nohup bash -c {shlex.quote(loop)} >/dev/null 2>&1 &"
            " echo $! > /tmp/lb-loop.pid"
        )
        assert self.lab.ssh(self.host, cmd).returncode == 0
        return self

    def codes(self) -> list[str]:
        return self.lab.ssh(self.host, "cat /tmp/lb-codes 2>/dev/null").stdout.split()

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.codes()) < n and time.monotonic() < deadline:
            time.sleep(0.5)

    def __exit__(self, *exc):
        self.lab.ssh(
            self.host,
            "touch /tmp/lb-stop; pid=$(cat /tmp/lb-loop.pid); while kill -0 $pid 2>/dev/null; do sleep 0.2; done",
        )


def test_completion_through_the_load_balancer(lab):
    wait_all_up(lab)
    res = lab.ssh(client(lab), curl_completion(lab))
    assert res.returncode == 0, res.stderr
    body = json.loads(res.stdout)
    assert body["model"] == MODEL
    assert isinstance(body["choices"][0]["text"], str)
    assert 0 < body["usage"]["completion_tokens"] <= 4


def test_request_without_a_token_is_refused_and_audited_with_the_client_address(lab):
    wait_all_up(lab)
    res = lab.ssh(client(lab), curl_completion(lab, role=None) + " -o /dev/null -w '%{http_code}'")
    assert res.stdout == "401", (res.stdout, res.stderr)
    res = lab.ssh(client(lab), curl_completion(lab, role="no_role") + " -o /dev/null -w '%{http_code}'")
    assert res.stdout == "403", (res.stdout, res.stderr)
    events = []
    for h in lab.hosts:
        lines = lab.ssh(h, f"cat {AUDIT_LOG}").stdout.splitlines()
        events += [json.loads(line) for line in lines]
    refused = [e for e in events if e["event"] == "AUTH_FAILED" and e["path"] == "/v1/completions"]
    assert refused and refused[-1]["ip"] == client(lab).ip  # X-Forwarded-For from the trusted load balancer
    denied = [e for e in events if e["event"] == "ACCESS_DENIED"]
    assert denied and denied[-1]["user"] == "lab-no_role"


def test_requests_succeed_with_a_runtime_host_stopped(lab):
    if len(lab.hosts) < 2:
        pytest.skip("needs two runtime hosts (DEEPFLEET_LAB_HOSTS >= 2)")
    victim = lab.hosts[-1]
    wait_all_up(lab)
    try:
        with RequestLoop(lab) as loop:
            loop.wait_for(5)
            assert lab.ssh(victim, "systemctl stop deepfleet-runtime").returncode == 0
            stopped_at = len(loop.codes())
            loop.wait_for(stopped_at + 15)  # HAProxy takes it out after inter x fall; keep sending meanwhile
            assert haproxy_status(lab)[victim.name] != "UP"
        codes = loop.codes()
        assert len(codes) >= stopped_at + 15, codes
        assert set(codes) == {"200"}, f"failed requests while {victim.name} was stopped: {codes}"
    finally:
        lab.ssh(victim, "systemctl start deepfleet-runtime")
        wait_all_up(lab)


def service_start_times(lab) -> dict[str, str]:
    cmd = "systemctl show deepfleet-runtime -p ExecMainStartTimestampMonotonic --value"
    return {h.name: lab.ssh(h, cmd).stdout.strip() for h in lab.hosts}


def test_revision_switch_drops_no_requests(lab, tmp_path):
    """A new model revision published to the object store: runtime.yml fetches it (site cache, then every host,
    verified), flips each host's `current` link and restarts it drained, one host at a time, while requests flow;
    a second run switches back to the lab's revision (still on the hosts: nothing is fetched) the same way."""
    wait_all_up(lab)
    before = service_start_times(lab)
    new = objectstore.publish(lab.state, tmp_path / objectstore.MODEL, seed=1)
    with RequestLoop(lab) as loop:
        loop.wait_for(3)
        rc, out = lab.ansible("playbooks/runtime.yml", "-e", json.dumps({"model_store_revision": new}))
        assert rc == 0, out[-3000:]
        middle = service_start_times(lab)
        served = {h.name: lab.ssh(h, f"readlink {MODEL_ROOT}/current").stdout.strip() for h in lab.hosts}
        rc, out = lab.ansible("playbooks/runtime.yml")
        assert rc == 0, out[-3000:]
        loop.wait_for(len(loop.codes()) + 3)
    after = service_start_times(lab)
    assert served == {h.name: new for h in lab.hosts}
    reads = objectstore.reads(lab.state, new)  # the cache host fetched it; the other hosts from the cache
    assert reads and set(reads.values()) == {1}, reads
    assert all(before[h] != middle[h] != after[h] for h in before), (before, middle, after)
    codes = loop.codes()
    assert set(codes) == {"200"}, f"requests failed during the revision switch: {codes}"


def test_audit_log_survives_a_forced_rotation(lab):
    """logrotate -f with the role's policy: every line written before is in the rotated file, whole; the next
    event goes to a new file the runtime makes itself, with the service user as owner and mode 0640."""
    host = lab.hosts[0]
    before = lab.ssh(host, f"cat {AUDIT_LOG}").stdout
    assert '"event"' in before
    run = lab.ssh(host, "logrotate -f /etc/logrotate.d/deepfleet-audit")
    assert run.returncode == 0 and "error" not in run.stderr, run.stderr
    rotated = lab.ssh(host, f"ls -t {AUDIT_LOG}-* | grep -v '[.]gz$' | head -1").stdout.strip()
    assert rotated, lab.ssh(host, f"ls -l {AUDIT_LOG}*").stdout
    kept = lab.ssh(host, f"cat {rotated}").stdout
    assert kept.startswith(before) and all(json.loads(line) for line in kept.splitlines())
    refused = lab.ssh(host, f"curl -sS -m 30 --cacert {CA_FILE} -o /dev/null -w '%{{http_code}}' "
                            f"https://127.0.0.1:{API_PORT}/v1/models").stdout  # no token: an audited refusal
    assert refused == "401"
    stat = lab.ssh(host, f"stat -c '%U %a' {AUDIT_LOG}").stdout.strip()
    assert stat == "deepfleet 640", stat  # roles/inference_runtime: inference_runtime_user
    fresh = [json.loads(line) for line in lab.ssh(host, f"cat {AUDIT_LOG}").stdout.splitlines()]
    assert fresh and fresh[-1]["event"] == "AUTH_FAILED" and fresh[-1]["path"] == "/v1/models"


def test_prometheus_scrapes_the_runtime_targets(lab):
    query = "curl -fsS 'http://127.0.0.1:9090/api/v1/query?query=up%7Bjob%3D%22deepfleet%22%7D'"
    deadline = time.monotonic() + 120
    while True:
        result = json.loads(lab.ssh(lb_host(lab), query).stdout)["data"]["result"]
        up = {r["metric"]["instance"]: r["value"][1] for r in result}
        if up == {h.name: "1" for h in lab.hosts} or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert up == {h.name: "1" for h in lab.hosts}


class StatusLog:
    """Every 0.2 s on the load balancer: each runtime server's HAProxy status, one line per sample (a transition
    such as "UP 1/3" is written UP_1/3)."""

    def __init__(self, lab):
        self.lab, self.host = lab, lb_host(lab)

    def __enter__(self):
        sample = (f"echo 'show stat' | socat stdio unix-connect:{ADMIN_SOCKET}"
                  f" | awk -F, '$1 == \"{BACKEND}\" && $2 != \"BACKEND\" && $2 != \"FRONTEND\""
                  " {gsub(/ /, \"_\", $18); printf \"%s=%s \", $2, $18} END {print \"\"}' >> /tmp/lb-status")
        loop = f"while [ ! -e /tmp/lb-status-stop ]; do {sample}; sleep 0.2; done"
        cmd = (f"rm -f /tmp/lb-status /tmp/lb-status-stop; nohup bash -c {shlex.quote(loop)} >/dev/null 2>&1 &"
               " echo $! > /tmp/lb-status.pid")
        assert self.lab.ssh(self.host, cmd).returncode == 0
        return self

    def samples(self) -> list[dict[str, str]]:
        out = self.lab.ssh(self.host, "cat /tmp/lb-status 2>/dev/null").stdout
        return [dict(f.split("=", 1) for f in line.split()) for line in out.splitlines() if line.strip()]

    def __exit__(self, *exc):
        self.lab.ssh(self.host, "touch /tmp/lb-status-stop; pid=$(cat /tmp/lb-status.pid);"
                                " while kill -0 $pid 2>/dev/null; do sleep 0.2; done")


def test_rolling_gpu_upgrade_drill_drops_no_request_and_keeps_one_host_up(lab):
    """playbooks/gpu.yml with gpu_upgrade_force (the lab has no GPU, so no driver differs): each runtime host in
    turn is drained, its runtime restarted, waited for and put back, while requests flow through HAProxy."""
    if len(lab.hosts) < 2:
        pytest.skip("needs two runtime hosts (DEEPFLEET_LAB_HOSTS >= 2)")
    wait_all_up(lab)
    before = service_start_times(lab)
    with StatusLog(lab) as status, RequestLoop(lab) as loop:
        loop.wait_for(3)
        rc, out = lab.ansible("playbooks/gpu.yml", "-e", json.dumps({"gpu_upgrade_force": True}))
        assert rc == 0, out[-3000:]
        loop.wait_for(len(loop.codes()) + 3)
    after = service_start_times(lab)
    samples = status.samples()
    names = {h.name for h in lab.hosts}
    assert all(before[h] != after[h] for h in before), (before, after)  # every host was restarted
    # UP, or UP_1/3 (failing checks, still sent requests): in service; DRAIN, DOWN, DOWN_1/2, MAINT: not
    out_of_service = {h for s in samples for h, state in s.items() if not state.startswith("UP")}
    assert out_of_service == names, f"not every host left service during the roll: {samples}"
    both_down = [s for s in samples if set(s) == names and not any(v.startswith("UP") for v in s.values())]
    assert not both_down, f"no runtime host was UP in HAProxy at some point: {both_down[:3]}"
    codes = loop.codes()
    assert set(codes) == {"200"}, f"requests failed during the rolling upgrade: {codes}"
