"""Bring a lab instance up, report on it, take it down.

One instance = a host bridge with a private /24, a private apt-cacher-ng bound on the bridge address, and N
systemd-nspawn hosts (systemd as PID 1), each in its own network namespace behind a veth on the bridge.
Hosts get no default route and the controller's nftables table for the instance lets them reach only the apt
proxy on the controller; IP forwarding is left as it is (off)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from lab import disks, objectstore, rootfs, system
from lab.config import (
    CACHE_ROOT,
    GLOBAL_LOCK,
    HOST_OFFSET,
    INVENTORY_ROOT,
    MAX_HOSTS,
    SSH_TIMEOUT_S,
    SUBNET_BASE,
    LabError,
    Names,
    check_kernel,
    check_root,
    check_tools,
    default_name,
    ensure_sbin_on_path,
    host_name,
    pick_port,
    validate_hosts,
    validate_name,
    validate_port,
)
from lab.inventory import SSH_OPTS, inventory_path, write_inventory
from lab.state import Host, State, load, lock_path, locked, state_dir
from lab.teardown import teardown

HOSTLOOP = Path(__file__).with_name("hostloop.sh")
ACNG_CONF = """\
# private apt-cacher-ng of deepfleet lab instance {name}: serves only the Debian archive, to the lab hosts
CacheDir: {cache}
LogDir: {logdir}
SupportDir: /usr/lib/apt-cacher-ng
Port: {port}
BindAddress: {bind}
PidFile: {confdir}/pid
SocketPath: {confdir}/socket
ForeGround: 1
ExThreshold: 4
# only the remapped archive below is served: the proxy is no way out to other sites
ForceManaged: 1
Remap-debrep: deb.debian.org/debian ; http://deb.debian.org/debian/
"""


def ssh_base(state: State) -> list[str]:
    return ["ssh", "-i", state.key, *SSH_OPTS.split(), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]


def ssh(state: State, host: Host, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ssh_base(state), f"root@{host.ip}", command], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- checks before creating anything
def preflight(name: str, hosts: int, apt_port: int | None) -> None:
    ensure_sbin_on_path()
    validate_name(name)
    validate_hosts(hosts)
    check_root()
    check_tools()
    check_kernel()
    disks.check_loop_support()
    validate_port(apt_port)


def foreign_objects(names: Names, n: int) -> list[str]:
    """Kernel objects carrying this instance's tag that no state records: a lab whose state file was lost."""
    found = []
    if system.link_exists(names.bridge):
        found.append(f"bridge {names.bridge}")
    for i in range(1, n + 1):
        if system.link_exists(names.veth(i)):
            found.append(f"veth {names.veth(i)}")
        if system.netns_exists(names.netns(i)):
            found.append(f"netns {names.netns(i)}")
    if system.nft_table_exists(names.nft_table):
        found.append(f"nft table inet {names.nft_table}")
    return found


def pick_subnet() -> ipaddress.IPv4Network:
    """The first 10.77.X.0/24 that no route or address on the controller overlaps."""
    used = []
    for cmd in (["ip", "-j", "-4", "route", "show", "table", "all"], ["ip", "-j", "-4", "addr"]):
        for item in json.loads(system.run(cmd).stdout or "[]"):
            if "dst" in item and item["dst"] != "default" and item["dst"][0].isdigit():
                used.append(ipaddress.ip_network(item["dst"], strict=False))
            for a in item.get("addr_info", []):
                used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for x in range(1, 255):
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabError(f"no free {SUBNET_BASE}.X.0/24 subnet on this machine", "take down other labs (make lab-status)")


def healthy(state: State) -> bool:
    if state.status != "up":
        return False
    for res in state.resources:
        if res["kind"] == "process" and not system.alive(res):
            return False
        if res["kind"] in ("bridge", "veth") and not system.link_exists(res["name"]):
            return False
        if res["kind"] == "loop" and not disks.attached(res):
            return False
    return all(_port_open(h.ip, 22, 1.0) for h in state.hosts)


def _port_open(ip: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------- up
def up(name: str | None = None, hosts: int = 2, apt_port: int | None = None, log=print) -> State:
    name = name or default_name()
    preflight(name, hosts, apt_port)
    with locked(lock_path(name)):
        existing = load(name)
        if existing is not None:
            if healthy(existing) and len(existing.hosts) == hosts and apt_port in (None, existing.apt_port):
                log(f"==> lab {name} is already up: reusing it")
                write_inventory(existing)
                return existing
            log(f"==> lab {name}: found leftovers of an earlier run ({existing.status}); removing what it recorded")
            if teardown(existing, log):
                raise LabError(f"could not remove the leftovers of lab {name}",
                               f"see above, then `python -m lab down --name {name}`")
        names = Names.for_state_dir(state_dir(name))
        foreign = foreign_objects(names, MAX_HOSTS)
        foreign += [f"loop device {d}" for d in disks.attached_under(state_dir(name))]
        if foreign:
            raise LabError(
                f"{', '.join(foreign)} exist(s) but lab/.state/{name} records none of it (its state was lost?)",
                "remove them by hand (ip link del / ip netns del / nft delete table / losetup -d) or use another "
                "--name",
            )
        state = State.new(name)
        t0 = time.monotonic()
        try:
            _create(state, hosts, apt_port, log)
        except BaseException as e:
            log(f"==> lab {name}: {'interrupted' if isinstance(e, KeyboardInterrupt) else 'failed'}; "
                "removing what this run created")
            errors = teardown(state, log)
            if errors:
                log(f"    some leftovers remain; `python -m lab down --name {name}` retries")
            raise
        log(f"==> lab {name} up in {time.monotonic() - t0:.0f} s")
        return state


def _create(state: State, n: int, apt_port: int | None, log) -> None:
    names = state.names
    sd = Path(state.state_dir)
    sd.mkdir(parents=True)
    state.record("path", path=str(sd))

    state.key = str(sd / "id_ed25519")
    system.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"deepfleet-lab-{state.name}", "-f", state.key])

    with locked(GLOBAL_LOCK):  # subnet and port choice: two labs starting at once must not pick the same
        net = pick_subnet()
        state.subnet = str(net)
        state.bridge_ip = str(net.network_address + 1)
        state.apt_port = apt_port or pick_port()
        state.store_port = pick_port({state.apt_port})
        log(f"==> lab {state.name}: subnet {net}, bridge {names.bridge}, apt proxy {state.apt_proxy}")
        system.run(["ip", "link", "add", names.bridge, "type", "bridge"])
        state.record("bridge", name=names.bridge)
        system.run(["ip", "addr", "add", f"{state.bridge_ip}/{net.prefixlen}", "dev", names.bridge])
        system.run(["ip", "link", "set", names.bridge, "up"])
        _firewall(state)
        _start_apt_proxy(state)
        objectstore.start(state, _port_open)
    objectstore.seed(state, log)

    base = rootfs.ensure_base(state.apt_proxy, log)

    addrs = {host_name(i): str(net.network_address + HOST_OFFSET + i) for i in range(1, n + 1)}
    authorized = Path(state.key + ".pub").read_text()
    log(f"==> lab {state.name}: starting {n} host(s)")
    for i in range(1, n + 1):
        hn = host_name(i)
        host = Host(name=hn, ip=addrs[hn], machine=names.machine(i), netns=names.netns(i), veth=names.veth(i),
                    root=str(sd / "hosts" / hn / "root"))
        state.hosts.append(host)
        host_dir = Path(host.root).parent
        for sub in ("upper", "work", "root", "containers"):
            (host_dir / sub).mkdir(parents=True)
        state.record("path", path=str(host_dir))
        system.run(["mount", "-t", "overlay", "overlay", "-o", rootfs.overlay_options(base, host_dir), host.root])
        state.record("mount", path=host.root)
        rootfs.personalize(Path(host.root), hostname=hn, hosts=addrs, authorized_key=authorized,
                           apt_proxy=state.apt_proxy)
        _network(state, host, i, net.prefixlen)
        # before the host starts: `down` then stops the container (releasing its mounts) before detaching
        disks.attach(state, host, host_dir / "disks", log)
        _start_host(state, host, i)

    _wait_ssh(state)
    for host in state.hosts:
        disks.make_nodes(state, host, ssh)
    write_inventory(state)
    state.record("path", path=str(inventory_path(state.name)), prune_empty_parent=str(INVENTORY_ROOT))
    state.status = "up"
    state.save()


def _firewall(state: State) -> None:
    """Input from the lab bridge to the controller: only the apt proxy and the object store (and replies to
    the controller's own connections, e.g. SSH from Ansible). Host to host on the bridge: allowed (with
    br_netfilter loaded, bridged frames pass this forward hook too). Anything routed off or onto the bridge:
    dropped, whatever ip_forward says."""
    t, br = state.names.nft_table, state.names.bridge
    rules = f"""
table inet {t} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname "{br}" ct state established,related accept
    iifname "{br}" ip daddr {state.bridge_ip} tcp dport {{ {state.apt_port}, {state.store_port} }} accept
    iifname "{br}" meta l4proto icmp accept
    iifname "{br}" drop
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{br}" oifname "{br}" accept
    iifname "{br}" drop
    oifname "{br}" drop
  }}
}}
"""
    system.run(["nft", "-f", "-"], input=rules)
    state.record("nft", table=t)


def _start_apt_proxy(state: State) -> None:
    confdir = Path(state.state_dir) / "apt-proxy"
    (confdir / "log").mkdir(parents=True)
    (CACHE_ROOT / "apt").mkdir(parents=True, exist_ok=True)
    (confdir / "acng.conf").write_text(ACNG_CONF.format(
        name=state.name, cache=CACHE_ROOT / "apt", logdir=confdir / "log", port=state.apt_port,
        bind=state.bridge_ip, confdir=confdir))
    cg = system.cgroup_create(state.names.cgroup("apt"))
    state.record("cgroup", paths=cg)
    with open(confdir / "stdout.log", "w") as out:
        proc = subprocess.Popen(["apt-cacher-ng", "-c", str(confdir)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=system.cgroup_joiner(cg))
    state.record("process", role="apt-proxy", **system.identity(proc.pid))
    deadline = time.monotonic() + 15
    while not _port_open(state.bridge_ip, state.apt_port, 0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (confdir / "stdout.log").read_text()[-600:]
            raise LabError(f"apt-cacher-ng did not start on {state.apt_proxy}: {tail.strip()}",
                           "check that the port is free (or pass --apt-port)")
        time.sleep(0.1)


def _network(state: State, host: Host, i: int, prefixlen: int) -> None:
    names = state.names
    run_netns = Path("/run/netns")
    if not system.is_mount(run_netns):  # `ip netns add` will make it a mount point: record that as ours
        state.record("run_netns_mount", path=str(run_netns), created_dir=not run_netns.exists())
    system.run(["ip", "netns", "add", host.netns])
    state.record("netns", name=host.netns)
    system.run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", names.veth_peer(i)])
    state.record("veth", name=host.veth)
    system.run(["ip", "link", "set", host.veth, "master", names.bridge, "up"])
    system.run(["ip", "link", "set", names.veth_peer(i), "netns", host.netns])
    ns = ["ip", "-n", host.netns]
    system.run([*ns, "link", "set", names.veth_peer(i), "name", "eth0"])
    system.run([*ns, "addr", "add", f"{host.ip}/{prefixlen}", "dev", "eth0"])
    system.run([*ns, "link", "set", "eth0", "up"])
    system.run([*ns, "link", "set", "lo", "up"])


def _start_host(state: State, host: Host, i: int) -> None:
    state.record("nspawn_runtime", machine=host.machine)
    cg = system.cgroup_create(state.names.cgroup(host.name))
    state.record("cgroup", paths=cg)
    cmd = ["systemd-nspawn", "--quiet", "--directory", host.root, "--machine", host.machine,
           f"--hostname={host.name}", "--boot", "--register=no", "--keep-unit", "--link-journal=no",
           "--resolv-conf=off", "--console=read-only", f"--network-namespace-path=/run/netns/{host.netns}",
           # nftables (hardening role) needs it; it only reaches the host's own network namespace.
           "--capability=CAP_NET_ADMIN",
           # a container engine's overlay storage cannot sit on the overlay root: give it a plain directory
           f"--bind={Path(host.root).parent / 'containers'}:/var/lib/containers"]
    log_file = Path(host.root).parent / "console.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(["bash", str(HOSTLOOP), *cmd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=system.cgroup_joiner(cg))
    state.record("process", role=f"host {host.name}", grace=30.0, **system.identity(proc.pid))


def _wait_ssh(state: State) -> None:
    deadline = time.monotonic() + SSH_TIMEOUT_S
    for host in state.hosts:
        while True:
            if _port_open(host.ip, 22, 1.0) and ssh(state, host, "true", timeout=15).returncode == 0:
                break
            if time.monotonic() > deadline:
                log_file = Path(host.root).parent / "console.log"
                raise LabError(f"{host.name} ({host.ip}) did not accept SSH within {SSH_TIMEOUT_S} s",
                               f"see its console log {log_file}")
            time.sleep(0.3)


# ---------------------------------------------------------------- down / status
def down(name: str | None = None, log=print) -> bool:
    name = name or default_name()
    with locked(lock_path(name)):
        state = load(name)
        if state is None:
            log(f"==> lab {name}: nothing recorded, nothing to remove")
            return True
        check_root()
        ensure_sbin_on_path()
        t0 = time.monotonic()
        errors = teardown(state, log)
        if errors:
            log(f"==> lab {name}: {len(errors)} object(s) could not be removed (see above); run `down` again")
            return False
        log(f"==> lab {name} removed in {time.monotonic() - t0:.1f} s")
        return True


def describe(state: State) -> dict:
    procs = [r for r in state.resources if r["kind"] == "process"]
    return {
        "name": state.name,
        "status": state.status if all(system.alive(p) for p in procs) else f"{state.status} (processes gone)",
        "subnet": state.subnet,
        "apt_proxy": state.apt_proxy,
        "inventory": str(inventory_path(state.name)),
        "hosts": [{"name": h.name, "ip": h.ip, "ssh": _port_open(h.ip, 22, 0.5),
                   "disks": [{"tier": r["tier"], "device": r["device"], "file": r["file"], "size_mib": r["size_mib"],
                              "attached": disks.attached(r)} for r in disks.host_loops(state, h.name)]}
                  for h in state.hosts],
    }


def purge_cache(log=print) -> None:
    """Delete the shared cache (apt downloads, root filesystem): the next `up` is a cold one."""
    if CACHE_ROOT.exists():
        check_root()
        shutil.rmtree(CACHE_ROOT)
        log(f"==> removed the lab cache {CACHE_ROOT}")
