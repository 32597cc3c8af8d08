#!/bin/bash
# NVSwitches of this host, one PCI slot a line: NVIDIA vendor 0x10de with the "bridge, other" class 0x0680xx
# (the GPUs are display/3D classes, see roles/nvidia_driver/files/gpu-scan.sh).
set -uo pipefail
for d in /sys/bus/pci/devices/*; do
  [ -r "$d/vendor" ] || continue
  [ "$(cat "$d/vendor")" = 0x10de ] || continue
  case "$(cat "$d/class")" in 0x0680*) echo "${d##*/}";; esac
done
exit 0
