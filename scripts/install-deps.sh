#!/usr/bin/env bash
# System packages the controller needs: lab (debootstrap, nspawn, apt proxy, netns tools), rclone (weights tests),
# promtool for the monitoring rule tests. Idempotent; needs root.
set -euo pipefail
PKGS=(debootstrap systemd-container apt-cacher-ng iproute2 nftables prometheus openssh-client rsync
      python3-venv util-linux procps rclone softhsm2)  # softhsm2: the PKCS#11 token of the key-store tests
if [ "$(id -u)" -ne 0 ]; then
  echo "error: installing system packages needs root (run as root, e.g. sudo make ...)" >&2
  exit 1
fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Daemons from these packages (apt-cacher-ng, prometheus) must not start on the controller by
  # themselves: the lab starts its own apt proxy, and promtool is all we need from prometheus.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "==> system packages present"
