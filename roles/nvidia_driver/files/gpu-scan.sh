#!/bin/bash
# NVIDIA GPUs of this host, one "SLOT DEVICE_ID" line each (e.g. "0000:1b:00.0 0x2335"), with no lspci needed.
# sysfs first: vendor 0x10de with a display (0x0300xx) or 3D controller (0x0302xx) class; NVSwitches (0x0680xx)
# and HDMI audio functions share the vendor id but are not GPUs. Hosts whose kernel shows no PCI bus to the
# system (sandboxed or virtualised ones, e.g. gVisor) fall back to what the loaded driver reports.
# Used by roles/nvidia_driver (detect.yml) and by the compliance suite, so both count the same GPUs.
set -uo pipefail
found=0
for d in /sys/bus/pci/devices/*; do
  [ -r "$d/vendor" ] || continue
  [ "$(cat "$d/vendor")" = 0x10de ] || continue
  case "$(cat "$d/class")" in 0x0300*|0x0302*) echo "${d##*/} $(cat "$d/device")"; found=1;; esac
done
[ "$found" = 1 ] && exit 0
command -v nvidia-smi >/dev/null || exit 0
# pci.device_id is device and vendor id together: 0x233510DE
nvidia-smi --query-gpu=pci.bus_id,pci.device_id --format=csv,noheader 2>/dev/null |
  while IFS=', ' read -r bus id; do
    [ -n "$bus" ] || continue
    bus="${bus,,}"
    echo "${bus#0000}" "0x$(printf '%s' "${id:2:4}" | tr 'A-F' 'a-f')"
  done
exit 0
