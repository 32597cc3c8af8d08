"""Failover drill in the lab (`make drill`): steady load through the lab's HAProxy while one runtime host fails.

Scenarios (both by default):
- kill: every process of the victim's deepfleet-runtime unit gets SIGKILL (no drain); systemd restarts it
  (Restart=on-failure) and the drill waits until HAProxy has it UP again.
- hang: the unit's processes get SIGSTOP (the kernel still accepts connections, nothing answers), SIGCONT after
  --hang-s seconds.

Measured per scenario: detection (fault -> HAProxy marks the victim DOWN, from its admin socket polled every
10 ms on the load-balancer host), the client-seen switchover (the most any request was held up by the fault
beyond the baseline median latency), requests failed (non-200 or no answer within --client-timeout-s), requests
HAProxy retried or redispatched (its wretr/wredis counters), P50/P99 before and during the event. Fault times
are taken on the victim and transitions on the load balancer: lab hosts are containers on this kernel, one clock.

    .venv/bin/python bench/drill.py [--scenario kill|hang|both] [--clients 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.inventory import SSH_OPTS  # noqa: E402
from lab.state import all_states  # noqa: E402

UNIT = "deepfleet-runtime"
ADMIN_SOCKET = "/run/haproxy/admin.sock"  # deepfleet_lb_admin_socket

# Runs on the load-balancer host: print "time server status" on every status change of the backend's servers,
# and the final counters as one JSON line, polling HAProxy's admin socket every 10 ms for `seconds`.
POLLER = r"""
import json, socket, sys, time
sock_path, seconds = sys.argv[1], float(sys.argv[2])
def stat():
    s = socket.socket(socket.AF_UNIX); s.connect(sock_path); s.sendall(b"show stat\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(head, l.split(","))) for l in lines[1:] if l]
    return {r["svname"]: r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND") and r["pxname"] != "stats"}
def counters(rows):
    return {k: {c: v[c] for c in ("wretr", "wredis", "econ", "eresp")} for k, v in rows.items()}
first = stat(); last = {k: v["status"] for k, v in first.items()}
print(json.dumps({"start": time.time(), "counters": counters(first), "status": last}), flush=True)
end = time.time() + seconds
while time.time() < end:
    now = stat(); t = time.time()
    for k, v in now.items():
        if v["status"] != last.get(k):
            print(json.dumps({"t": t, "server": k, "status": v["status"]}), flush=True); last[k] = v["status"]
    time.sleep(0.01)
"""


class DrillError(Exception):
    pass


@dataclass
class Lab:
    key: str
    lb_ip: str
    lb_port: int
    backends: dict[str, str]  # host name -> ip
    model: str = ""  # the served model id, from /v1/models

    def ssh(self, ip: str, command: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-i", self.key, *SSH_OPTS.split(), f"root@{ip}", command], input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)


def find_lab() -> Lab:
    states = [s for s in all_states() if s.status == "up"]
    if not states:
        raise DrillError("no lab is up in this checkout (lab/.state has none): bring one up with `make lab`")
    state = states[0]
    inv = yaml.safe_load(Path(state.inventory).read_text())["all"]
    children = inv["children"]
    hosts = {h.name: h.ip for h in state.hosts}
    lbs = list(children.get("loadbalancers", {}).get("hosts", {}))
    backends = {h: hosts[h] for h in children.get("gpu_nodes", {}).get("hosts", {}) if h in hosts}
    if not lbs or len(backends) < 2:
        raise DrillError(f"lab {state.name}: needs a load balancer and two runtime hosts (has {lbs}, "
                         f"{sorted(backends)}): `make lab` with HOSTS>=2")
    port = yaml.safe_load((REPO / "roles/loadbalancer/defaults/main.yml").read_text())["loadbalancer_port"]
    lab = Lab(state.key, hosts[lbs[0]], int(port), backends)
    try:
        conn = http.client.HTTPConnection(lab.lb_ip, lab.lb_port, timeout=5)
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise DrillError(f"load balancer {lab.lb_ip}:{lab.lb_port} answered {resp.status}: {body[:200]!r}")
        lab.model = json.loads(body)["data"][0]["id"]
    except OSError as e:
        raise DrillError(f"load balancer {lab.lb_ip}:{lab.lb_port} unreachable ({e}): is the lab converged "
                         "(`python -m lab converge`)?") from None
    return lab


@dataclass
class Request:
    start: float
    end: float
    ok: bool
    detail: str = ""


@dataclass
class Load:
    lab: Lab
    clients: int
    client_timeout_s: float
    max_tokens: int
    results: list[Request] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self) -> None:
        body = json.dumps({"model": self.lab.model, "prompt": "drill", "max_tokens": self.max_tokens})
        conn = None
        while not self._stop.is_set():
            start = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.lab.lb_ip, self.lab.lb_port, timeout=self.client_timeout_s)
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok, detail = resp.status == 200, "" if resp.status == 200 else f"{resp.status} {data[:120]!r}"
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                ok, detail = False, f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            self.results.append(Request(start, time.time(), ok, detail))

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(self.client_timeout_s + 5)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_scenario(lab: Lab, scenario: str, args) -> dict:
    victim_name = sorted(lab.backends)[-1]  # not the load balancer's own host when the lab has 2
    victim = lab.backends[victim_name]
    horizon = args.baseline_s + args.hang_s + args.recover_timeout_s + 10
    poller = subprocess.Popen(["ssh", "-i", lab.key, *SSH_OPTS.split(), f"root@{lab.lb_ip}",
                               f"python3 - {ADMIN_SOCKET} {horizon}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    poller.stdin.write(POLLER)
    poller.stdin.close()
    first = json.loads(poller.stdout.readline())
    if first["status"].get(victim_name) != "UP":
        poller.kill()
        raise DrillError(f"{victim_name} is {first['status'].get(victim_name)} in HAProxy before the drill: "
                         "wait for it to be UP")
    events: list[dict] = []
    reader = threading.Thread(target=lambda: events.extend(json.loads(line) for line in poller.stdout), daemon=True)
    reader.start()
    signal = "KILL" if scenario == "kill" else "STOP"
    with Load(lab, args.clients, args.client_timeout_s, args.max_tokens) as load:
        time.sleep(args.baseline_s)
        r = lab.ssh(victim, f"python3 -c 'import time,subprocess; t=time.time(); "
                            f"subprocess.run([\"systemctl\", \"kill\", \"-s\", \"{signal}\", \"{UNIT}\"], check=True); "
                            "print(t)'")
        if r.returncode != 0:
            raise DrillError(f"{victim_name}: could not send SIG{signal} to {UNIT}: {r.stderr.strip()}")
        fault = float(r.stdout.strip())
        if scenario == "hang":
            time.sleep(max(0.0, fault + args.hang_s - time.time()))
            lab.ssh(victim, f"systemctl kill -s CONT {UNIT}")
        deadline = time.time() + args.recover_timeout_s
        while time.time() < deadline and not any(e.get("server") == victim_name and e.get("status") == "UP"
                                                 and e["t"] > fault for e in list(events)):
            time.sleep(0.2)
        time.sleep(2)  # settle: a few requests on the returned host
    poller.kill()
    counters_end = _final_counters(lab)
    return summarise(scenario, victim_name, fault, load.results, events, first["counters"], counters_end)


def _final_counters(lab: Lab) -> dict:
    r = lab.ssh(lab.lb_ip, f"python3 - {ADMIN_SOCKET} 0", stdin=POLLER)
    return json.loads(r.stdout.splitlines()[0])["counters"]


def summarise(scenario, victim, fault, results, events, c0, c1) -> dict:
    before = [r for r in results if r.end < fault]
    base_p50 = _pct([r.end - r.start for r in before if r.ok], 0.5) or 0.0
    down = next((e["t"] for e in events if e.get("server") == victim and e["t"] >= fault
                 and e["status"].startswith("DOWN")), None)
    up = next((e["t"] for e in events if e.get("server") == victim and e["t"] > fault and e["status"] == "UP"), None)
    window_end = up or max(r.end for r in results)
    during = [r for r in results if r.end >= fault and r.start <= window_end]
    # new requests sent between the fault and HAProxy's verdict: how long the switch held them up
    new = [r for r in during if fault <= r.start <= (down or window_end)]
    switchover = max((r.end - r.start) - base_p50 for r in new) if new else 0.0
    inflight = [r for r in results if r.start < fault < r.end]
    retried = sum(int(c1[s]["wretr"] or 0) - int(c0[s]["wretr"] or 0) + int(c1[s]["wredis"] or 0)
                  - int(c0[s]["wredis"] or 0) for s in c1 if s in c0)
    failed = [r for r in results if not r.ok]
    return {
        "scenario": scenario, "victim": victim, "requests": len(results), "failed": len(failed),
        "failed_examples": sorted({r.detail for r in failed})[:3], "retried_by_haproxy": retried,
        "detection_ms": None if down is None else round((down - fault) * 1000),
        "returned_after_s": None if up is None else round(up - fault, 1),
        "switchover_ms": round(max(0.0, switchover) * 1000),
        "inflight_at_fault": len(inflight),
        "inflight_held_ms": round(max((r.end - fault for r in inflight), default=0.0) * 1000),
        "other_host_flaps": sum(1 for e in events if e.get("server") not in (None, victim)),
        "p50_before_ms": round(base_p50 * 1000),
        "p99_before_ms": round((_pct([r.end - r.start for r in before], 0.99) or 0) * 1000),
        "p99_during_ms": round((_pct([r.end - r.start for r in during], 0.99) or 0) * 1000),
        "requests_during": len(during), "haproxy_transitions": [e for e in events if "server" in e],
        "fault_time": fault,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("kill", "hang", "both"), default="both")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--baseline-s", type=float, default=6)
    ap.add_argument("--hang-s", type=float, default=8)
    ap.add_argument("--recover-timeout-s", type=float, default=90)
    ap.add_argument("--client-timeout-s", type=float, default=30)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        lab = find_lab()
        out = [run_scenario(lab, s, args) for s in (("kill", "hang") if args.scenario == "both" else (args.scenario,))]
    except DrillError as e:
        print(f"drill: {e}", file=sys.stderr)
        return 2
    for r in out:
        print(f"{r['scenario']:5} victim {r['victim']}: detection {r['detection_ms']} ms, switchover "
              f"{r['switchover_ms']} ms (in flight at the fault: {r['inflight_at_fault']}, held up to "
              f"{r['inflight_held_ms']} ms), {r['failed']}/{r['requests']} failed, {r['retried_by_haproxy']} retried, "
              f"P99 {r['p99_before_ms']} -> {r['p99_during_ms']} ms (P50 before {r['p50_before_ms']} ms), "
              f"back after {r['returned_after_s']} s, other host's state changes {r['other_host_flaps']}")
        for example in r["failed_examples"]:
            print(f"        failed: {example}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
