"""mig_layout_problems: what is wrong with a MIG layout (nvidia-mig-parted's mig-configs entry list) for the
GPUs of a host, as messages naming the entry, the GPU and the profile. [] when it can be applied.

Checked per GPU after the entries are resolved (a later entry overrides an earlier one for the GPUs it names):
the GPU is MIG-capable, every profile is one it offers, no profile exceeds its instance limit, and the
profiles together fit in the GPU's compute and memory slices. The placement rules nvidia-smi applies on top
(which slice a profile may start at) are not modelled: a layout that passes here can still be refused by the
apply, which then fails naming nvidia-mig-parted's message."""

from __future__ import annotations

ENTRY_KEYS = {"devices", "mig-enabled", "mig-devices"}


def _indexes(devices, count: int, where: str, problems: list[str]) -> list[int]:
    if devices == "all":
        return list(range(count))
    if not isinstance(devices, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in devices):
        problems.append(f"{where}.devices: {devices!r} is neither 'all' nor a list of GPU indexes")
        return []
    outside = [d for d in devices if not 0 <= d < count]
    if outside:
        found = f"{count} GPU(s): 0..{count - 1}" if count else "no GPU detected"
        problems.append(f"{where}.devices: GPU index {outside} not on this host ({found})")
    return [d for d in devices if 0 <= d < count]


def _entry(entry, where: str, problems: list[str]) -> tuple[bool, dict] | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: {entry!r} is not a mapping with devices, mig-enabled, mig-devices")
        return None
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown} (known: {sorted(ENTRY_KEYS)})")
    enabled = entry.get("mig-enabled")
    if not isinstance(enabled, bool):
        problems.append(f"{where}.mig-enabled: {enabled!r} is not true or false")
        return None
    wanted = entry.get("mig-devices", {}) or {}
    if not isinstance(wanted, dict):
        problems.append(f"{where}.mig-devices: {wanted!r} is not a mapping profile -> count")
        return None
    if not enabled and wanted:
        problems.append(f"{where}: mig-devices {sorted(wanted)} given with mig-enabled false")
    for profile, n in wanted.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"{where}.mig-devices.{profile}: {n!r} is not a count >= 1")
    return enabled, wanted


def mig_layout_problems(layout, device_ids: list[str], gpus: dict, var: str = "nvidia_mig_layout") -> list[str]:
    problems: list[str] = []
    if not isinstance(layout, list):
        return [f"{var}: {layout!r} is not a list of mig-parted entries"]
    per_gpu: dict[int, tuple[str, bool, dict]] = {}
    for i, entry in enumerate(layout):
        where = f"{var}[{i}]"
        parsed = _entry(entry, where, problems)
        if parsed is None:
            continue
        for index in _indexes(entry.get("devices"), len(device_ids), where, problems):
            per_gpu[index] = (where, *parsed)
    for index, (where, enabled, wanted) in sorted(per_gpu.items()):
        device = device_ids[index]
        gpu = gpus.get(device)
        if gpu is None:
            if enabled:
                problems.append(f"{where}: GPU {index} (PCI device {device}) does not support MIG")
            continue
        if not enabled:
            continue
        offered = gpu["profiles"]
        unknown = [p for p in wanted if p not in offered]
        if unknown:
            problems.append(
                f"{where}.mig-devices: {gpu['name']} (GPU {index}) offers no profile {', '.join(map(str, unknown))}"
                f" (it offers: {', '.join(offered)})"
            )
            continue
        counts = {p: n for p, n in wanted.items() if isinstance(n, int) and not isinstance(n, bool)}
        for profile, n in counts.items():
            if n > offered[profile]["max"]:
                problems.append(f"{where}.mig-devices.{profile}: {n} instances, {gpu['name']} holds at most "
                                f"{offered[profile]['max']}")
        for kind in ("compute", "memory"):
            used = sum(offered[p][kind] * n for p, n in counts.items())
            if used > gpu["slices"][kind]:
                problems.append(f"{where}.mig-devices: {used} {kind} slices on GPU {index}, {gpu['name']} has "
                                f"{gpu['slices'][kind]}")
    return problems


class FilterModule:
    def filters(self):
        return {"mig_layout_problems": mig_layout_problems}
