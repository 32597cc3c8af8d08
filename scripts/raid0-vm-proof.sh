#!/usr/bin/env bash
# make raid0-vm: roles/storage_tiers' md RAID0 path for real. The lab's hosts are containers on this machine's
# kernel, which has no md driver, so there the role can only refuse a RAID tier (tests/lab). Here a qemu VM
# boots Debian's own kernel (linux-image-amd64, installed into a copy of the lab's root filesystem) with two
# virtio disks; playbooks/storage.yml declares them as the hot tier (RAID0), runs twice (the second changes
# nothing), then the compliance suite's storage checks run against the VM over ssh://, RAID check included.
# Software emulation (TCG) by default: this sandbox's /dev/kvm hangs a guest kernel right after the BIOS;
# ACCEL=kvm where KVM works. Not part of `make test` (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PATH="$PWD/.venv/bin:$PATH" PYTHONPATH="$PWD/runtime:$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=${WORK:-build/raid0-vm}
ACCEL=${ACCEL:-tcg}
DISK_MIB=512  # per RAID member (mkfs.xfs needs >= 300 MiB)

for tool in qemu-system-x86_64 qemu-img mkfs.ext4 ssh; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing (Debian: apt-get install qemu-system-x86 qemu-utils)" >&2; exit 1; }
done
rootfs=$("$PY" -c 'from lab import rootfs; print(rootfs.base_dir())')
[ -d "$rootfs" ] || { echo "error: no cached lab root filesystem at $rootfs: run make lab once" >&2; exit 1; }

mkdir -p "$WORK"
rm -f "$WORK"/*.img "$WORK"/*.log
t0=$(date +%s)
stamp() { echo "==> [$(( $(date +%s) - t0 )) s] $*"; }
root="$WORK/root"
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null || true
  for m in dev/pts dev proc sys; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
  rm -rf "$root"
}
trap cleanup EXIT
cache="$WORK/cache"

# The VM's root disk is built once (kept in $WORK/cache, ~5 min: apt installs the kernel, and mdadm + xfsprogs
# natively here, since apt under emulation takes most of an hour: the role then finds its tools installed) and
# is copied fresh for every run, so each proof starts from a host the role never configured.
if [ ! -f "$cache/root.img" ]; then
  stamp "root filesystem: copy of $rootfs + linux-image-amd64 (cached in $cache)"
  rm -rf "$cache"
  mkdir -p "$cache"
  cp -a "$rootfs" "$root"
  for m in proc sys dev dev/pts; do mount --bind "/$m" "$root/$m"; done
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get -q update && apt-get -q install -y linux-image-amd64 initramfs-tools mdadm xfsprogs' \
    >"$cache/chroot-apt.log" 2>&1 \
    || { tail -20 "$cache/chroot-apt.log" >&2; exit 1; }
  for m in dev/pts dev proc sys; do umount -l "$root/$m"; done
  cp "$root"/boot/vmlinuz-* "$cache/vmlinuz"
  cp "$root"/boot/initrd.img-* "$cache/initrd.img"
  # Emulated, a full initramfs rebuild (the role's md handler) takes 20+ min: only this VM's modules inside.
  echo MODULES=dep >"$root/etc/initramfs-tools/conf.d/deepfleet-vm"
  # identity: name, SSH (a key of this cache), DHCP on the VM's NIC (qemu user networking: 10.0.2.0/24, DNS .3)
  echo raid0-vm >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 raid0-vm\n' >"$root/etc/hosts"
  echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
  echo 'LABEL=vm-root / ext4 defaults 0 1' >"$root/etc/fstab"  # the members may come first
  ssh-keygen -q -A -f "$root"
  ssh-keygen -q -t ed25519 -N '' -f "$cache/id_ed25519"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$cache/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
  printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/80-vm.network"
  ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/"
  rm -f "$root/etc/apt/apt.conf.d/01deepfleet-lab-proxy"
  mkfs.ext4 -q -F -L vm-root -d "$root" "$cache/root.img.tmp" 3G
  mv "$cache/root.img.tmp" "$cache/root.img"
  rm -rf "$root"
fi
cp --sparse=always "$cache/root.img" "$WORK/root.img"
qemu-img create -q -f raw "$WORK/member-0.img" "${DISK_MIB}M"
qemu-img create -q -f raw "$WORK/member-1.img" "${DISK_MIB}M"

port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stamp "boot: qemu ($ACCEL), Debian's kernel, SSH on 127.0.0.1:$port"
qemu-system-x86_64 -machine accel="$ACCEL" -m 2048 -smp 2 -nographic -no-reboot \
  -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" -append "root=LABEL=vm-root rw console=ttyS0 panic=-1" \
  -drive "file=$WORK/root.img,if=virtio,format=raw" \
  -drive "file=$WORK/member-0.img,if=none,id=m0,format=raw" -device virtio-blk-pci,drive=m0,serial=deepfleet-hot-0 \
  -drive "file=$WORK/member-1.img,if=none,id=m1,format=raw" -device virtio-blk-pci,drive=m1,serial=deepfleet-hot-1 \
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=net0 \
  >"$WORK/console.log" 2>&1 &
qemu_pid=$!
ssh_opts=(-i "$cache/id_ed25519" -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
          -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes)
for _ in $(seq 120); do
  ssh "${ssh_opts[@]}" root@127.0.0.1 true 2>/dev/null && break
  kill -0 "$qemu_pid" 2>/dev/null || { echo "error: the VM stopped:" >&2; tail -30 "$WORK/console.log" >&2; exit 1; }
  sleep 2
done
ssh "${ssh_opts[@]}" root@127.0.0.1 true || { tail -30 "$WORK/console.log" >&2; exit 1; }
stamp "up: $(ssh "${ssh_opts[@]}" root@127.0.0.1 'uname -r; lsblk -dno NAME,SIZE,SERIAL /dev/vdb /dev/vdc' | tr '\n' ' ')"

inv="$WORK/inventory"
mkdir -p "$inv/host_vars"
cat >"$inv/hosts.yml" <<EOF
all:
  hosts:
    raid0-vm:
      ansible_host: 127.0.0.1
      ansible_port: $port
      ansible_user: root
      ansible_ssh_private_key_file: $PWD/$cache/id_ed25519
      ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
      ansible_python_interpreter: /usr/bin/python3
EOF
cat >"$inv/host_vars/raid0-vm.yml" <<'EOF'
storage_tiers_hot_devices: [/dev/disk/by-id/virtio-deepfleet-hot-0, /dev/disk/by-id/virtio-deepfleet-hot-1]
EOF
recap() { grep -E '^raid0-vm +:' "$1" | tail -1; }
stamp "playbooks/storage.yml (hot tier: RAID0 over the two virtio disks)"
ansible-playbook -i "$inv" playbooks/storage.yml >"$WORK/converge-1.log" 2>&1 || { tail -40 "$WORK/converge-1.log" >&2; exit 1; }
echo "    $(recap "$WORK/converge-1.log")"
stamp "playbooks/storage.yml again (must change nothing)"
ansible-playbook -i "$inv" playbooks/storage.yml >"$WORK/converge-2.log" 2>&1 || { tail -40 "$WORK/converge-2.log" >&2; exit 1; }
echo "    $(recap "$WORK/converge-2.log")"
recap "$WORK/converge-2.log" | grep -q ' changed=0 ' || { echo "error: second run changed something" >&2; exit 1; }
ssh "${ssh_opts[@]}" root@127.0.0.1 'cat /proc/mdstat; findmnt -no SOURCE,FSTYPE,OPTIONS /models'
printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' >"$WORK/ssh_config"
stamp "compliance: tests/compliance/test_storage_tiers.py over ssh://"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/compliance/test_storage_tiers.py \
  --hosts="ssh://root@127.0.0.1:$port" --ssh-identity-file="$cache/id_ed25519" \
  --ssh-config="$WORK/ssh_config" --ansible-inventory="$inv" --inventory-host=raid0-vm 2>&1 | tee "$WORK/compliance.log" | tail -5
grep -qE '^[0-9]+ passed' <(tail -1 "$WORK/compliance.log") && ! grep -q 'skipped\|failed' <(tail -1 "$WORK/compliance.log") \
  || { echo "error: compliance did not pass without skips" >&2; exit 1; }
stamp "RAID0 proof passed"
