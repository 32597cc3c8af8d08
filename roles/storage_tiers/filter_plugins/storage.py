"""Pure logic of the storage_tiers role, importable by pytest."""

import posixpath


def systemd_mount_unit(path):
    """Mount unit name for a mount point, as `systemd-escape --path --suffix=mount` spells it."""
    if not path.startswith("/"):
        raise ValueError(f"mount point must be an absolute path, got {path!r}")
    norm = posixpath.normpath(path).strip("/")
    if not norm:
        return "-.mount"
    out = []
    for i, ch in enumerate(norm):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out) + ".mount"


TIER_ORDER = ("hot", "warm", "cold")


def storage_tiers_list(declared):
    """The declared tiers ({name: {devices, mount}}) as a list of dicts (name, devices, mount, target,
    raid, label) in tier order, tiers without devices left out. A tier with more than one device
    becomes an md RAID0 array, a single device is used directly."""
    tiers = []
    for name in TIER_ORDER:
        devices = list((declared.get(name) or {}).get("devices") or [])
        if not devices:
            continue
        mount = declared[name]["mount"]
        target = f"/dev/md/deepfleet-{name}" if len(devices) > 1 else devices[0]
        tiers.append({"name": name, "devices": devices, "mount": mount, "target": target,
                      "raid": len(devices) > 1, "label": f"df-{name}"})
    return tiers


def storage_tiers_problems(tiers):
    """Declaration errors of a tier list, each naming the variable; [] when the declaration is sound."""
    problems = []
    seen_dev, seen_mount = {}, {}
    for tier in tiers:
        var = f"storage_tiers_{tier['name']}_devices"
        mount_var = f"storage_tiers_{tier['name']}_mount"
        for dev in tier["devices"]:
            if not str(dev).startswith("/dev/"):
                problems.append(f"{var}: {dev!r} is not a /dev path")
            if dev in seen_dev:
                problems.append(f"{var}: {dev} is already used by {seen_dev[dev]}")
            seen_dev[dev] = var
        mount = tier["mount"]
        if not str(mount).startswith("/") or posixpath.normpath(mount) == "/":
            problems.append(f"{mount_var}: {mount!r} must be an absolute path other than /")
        elif mount in seen_mount:
            problems.append(f"{mount_var}: {mount} is already the mount point of {seen_mount[mount]}")
        seen_mount[mount] = mount_var
    return problems


class FilterModule:
    def filters(self):
        return {
            "systemd_mount_unit": systemd_mount_unit,
            "storage_tiers_list": storage_tiers_list,
            "storage_tiers_problems": storage_tiers_problems,
        }
