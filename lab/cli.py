"""python -m lab {up,converge,down,status}: the local lab of systemd-nspawn test hosts."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from lab.config import DEFAULT_HOSTS, MAX_HOSTS, MIN_HOSTS, LabError, default_name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lab",
        description="Local test hosts for the playbooks: Debian bookworm systemd-nspawn containers (systemd as "
        "PID 1), one network namespace each on a private bridge, Debian packages only through a private "
        "apt-cacher-ng. Needs root.",
        epilog="make lab = up + converge; make lab-down = down --all; make lab-status = status.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{up,converge,down,status}")
    name_help = f"lab instance name (default for this checkout: {default_name()})"

    s = sub.add_parser("up", help="bring a lab up (reuses a healthy one, replaces leftovers of a crashed one)")
    s.add_argument("--name", help=name_help)
    s.add_argument("--hosts", type=int, default=DEFAULT_HOSTS,
                   help=f"number of hosts, {MIN_HOSTS}-{MAX_HOSTS} (default {DEFAULT_HOSTS})")
    s.add_argument("--apt-port", type=int, help="port of the lab's apt proxy (default: a free one from 3142)")

    s = sub.add_parser("converge", help="run playbooks/site.yml and the compliance suite against a lab, summarise")
    s.add_argument("--name", help=name_help)

    s = sub.add_parser("down", help="remove everything a lab created (as recorded in lab/.state/NAME)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--name", help=name_help)
    g.add_argument("--all", action="store_true", help="every lab recorded in this checkout")
    s.add_argument("--purge-cache", action="store_true",
                   help="also delete the shared apt and root filesystem cache (the next up is a cold one)")

    s = sub.add_parser("status", help="show the labs of this checkout")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _exit_on_sigterm(signum, _frame):
    # SystemExit unwinds like Ctrl-C does: a half-made `up` is rolled back on the way out
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _dispatch(args)
    except LabError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args) -> int:
    from lab import instance  # noqa: PLC0415 - keep --help fast and free of side effects

    if args.cmd == "up":
        instance.up(args.name, args.hosts, args.apt_port)
        return 0
    if args.cmd == "converge":
        from lab.converge import converge  # noqa: PLC0415

        return converge(args.name)
    if args.cmd == "down":
        from lab.state import all_states  # noqa: PLC0415

        names = [s.name for s in all_states()] if args.all else [args.name or default_name()]
        if args.all and not names:
            print("==> no lab recorded in this checkout: nothing to remove")
        ok = all([instance.down(n) for n in names])
        if args.purge_cache:
            instance.purge_cache()
        return 0 if ok else 1
    if args.cmd == "status":
        from lab.state import all_states  # noqa: PLC0415

        labs = [instance.describe(s) for s in all_states()]
        if args.json:
            print(json.dumps(labs, indent=2))
            return 0
        if not labs:
            print("no lab is up in this checkout (make lab brings one up)")
        for lab in labs:
            print(f"lab {lab['name']}: {lab['status']}  subnet {lab['subnet']}  apt proxy {lab['apt_proxy']}")
            for h in lab["hosts"]:
                print(f"  {h['name']:6} {h['ip']:13} ssh {'up' if h['ssh'] else 'DOWN'}")
                for d in h["disks"]:
                    print(f"         {d['tier']:4} tier {d['device']:11} {d['size_mib']} MiB sparse "
                          f"{'' if d['attached'] else '(DETACHED) '}{d['file']}")
            print(f"  inventory {lab['inventory']}")
        return 0
    raise AssertionError(args.cmd)
