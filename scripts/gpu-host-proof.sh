#!/bin/bash
# Proof of the GPU roles and the compliance GPU checks on a real GPU host that has no package registry (the
# device tool's H200): the GPU roles with an Ansible local connection in --check mode, the compliance suite
# through testinfra's local:// backend with --require-gpu, the CDI smoke pattern on real nvidia-smi output,
# and nccl-tests' single-GPU path built from carried source. Writes its logs and a summary under RESULTS_DIR.
#   scripts/gpu-host-proof.sh RESULTS_DIR BRANCH CUDA [NCCL_TESTS_TARBALL]
set -uo pipefail
out="$1" branch="$2" cuda="$3" tarball="${4:-}"
mkdir -p "$out"
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$(command -v python3)"
step() { local name="$1"; shift; local t0=$SECONDS; "$@" >"$out/$name.log" 2>&1; local rc=$?
         printf '%-22s rc=%-3s %3ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$out/summary.txt"; }

facts() {
  echo "## pid 1: $(cat /proc/1/comm 2>/dev/null)  kernel: $(uname -r)"
  echo "## /sys/bus/pci/devices entries: $(ls /sys/bus/pci/devices 2>/dev/null | wc -l)"
  echo "## /sys/module/nvidia/version: $(cat /sys/module/nvidia/version 2>&1)"
  echo "## /proc/driver/nvidia/version:"; cat /proc/driver/nvidia/version 2>&1
  echo "## gpu-scan.sh:"; bash "$repo/roles/nvidia_driver/files/gpu-scan.sh"
  echo "## nvidia-smi -L:"; nvidia-smi -L
  nvidia-smi --query-gpu=name,pci.device_id,driver_version,persistence_mode,compute_cap,mig.mode.current \
    --format=csv
  echo "## nvcc: $(command -v nvcc)"; nvcc --version 2>&1 | tail -2
  ls -d /usr/local/cuda* 2>&1; cat /usr/local/cuda/version.json 2>&1 | head -5
  echo "## libnccl in ldconfig:"; ldconfig -p | grep -i nccl
  echo "## python NCCL: $("$py" -c 'import torch; print(torch.__version__, torch.cuda.nccl.version())' 2>&1)"
  echo "## systemctl: $(command -v systemctl)  nvidia-persistenced: $(command -v nvidia-persistenced)"
  echo "## dcgmi: $(command -v dcgmi)  nv-fabricmanager: $(command -v nv-fabricmanager)"
}
step facts facts

# nccl-tests from carried source against the NCCL the host has (system libnccl, else the Python wheel's),
# built in the background while the roles and the compliance suite run.
nccl_tests_build() {
  local src=/tmp/nccl-tests home=/tmp/nccl-home lib
  rm -rf "$src" "$home" && mkdir -p "$src" "$home/include" "$home/lib"
  tar -xzf "$tarball" -C "$src" --strip-components=1 || return 1
  lib="$(ldconfig -p | sed -n 's/.*libnccl.so.2 .*=> //p' | head -n1)"
  [ -n "$lib" ] || lib="$(find / -xdev -name 'libnccl.so.2' -path '*nvidia*' 2>/dev/null | head -n1)"
  local header; header="$(find "$(dirname "$(dirname "$lib")")" /usr/include -name nccl.h 2>/dev/null | head -n1)"
  echo "libnccl: $lib  nccl.h: $header"
  ln -s "$lib" "$home/lib/libnccl.so" && ln -s "$lib" "$home/lib/libnccl.so.2" && ln -s "$header" "$home/include/nccl.h"
  timeout 110 make -C "$src/src" -j"$(nproc)" ../build/all_reduce_perf NCCL_HOME="$home" \
    NVCC_GENCODE="-gencode=arch=compute_90,code=sm_90"
}
if [ -n "$tarball" ]; then
  (step nccl-tests-build nccl_tests_build) &
  build_pid=$!
fi

inv="$out/inventory.yml"
cat >"$inv" <<INV
all:
  children:
    gpu_nodes:
      hosts:
        gpuhost:
          ansible_connection: local
          ansible_python_interpreter: $py
          nvidia_driver_branch: "$branch"
          cuda_version: "$cuda"
          nvidia_driver_preinstalled: true
          nvidia_driver_gpu_required: true
          nccl_tests_mpi: false
INV
[ -n "$tarball" ] && echo "          nccl_tests_src: $tarball" >>"$inv"
cat >"$out/gpu-roles.yml" <<PLAY
- name: GPU roles on this host (check mode)
  hosts: gpu_nodes
  roles: [nvidia_driver, cuda, nccl]
PLAY
export ANSIBLE_ROLES_PATH="$repo/roles" ANSIBLE_NOCOLOR=1 ANSIBLE_HOST_KEY_CHECKING=0
step gpu-roles-check ansible-playbook -i "$inv" --check --diff "$out/gpu-roles.yml"
step compliance-gpu "$py" -m pytest -p no:cacheprovider -q -rA "$repo/tests/compliance/test_nvidia_driver.py" \
  "$repo/tests/compliance/test_cuda.py" "$repo/tests/compliance/test_nccl.py" \
  "$repo/tests/compliance/test_container_runtime.py" -k "gpu" --hosts=local:// --require-gpu \
  --ansible-inventory="$inv" --inventory-host=gpuhost --junitxml="$out/compliance-gpu.xml"

step smoke-pattern "$py" - "$repo" <<'PY'
import re, subprocess, sys, yaml
pattern = yaml.safe_load(open(sys.argv[1] + "/roles/container_runtime/vars/main.yml"))["container_runtime_smoke_gpu_line"]
lines = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout.splitlines()
gpus = int(subprocess.run(["nvidia-smi", "--query-gpu=count", "--format=csv,noheader"], capture_output=True,
                          text=True, check=True).stdout.split()[0])
matched = [line for line in lines if re.match(pattern, line)]
print(f"pattern {pattern!r}: {len(matched)} of {len(lines)} lines match, nvidia-smi counts {gpus} GPU(s)")
sys.exit(0 if len(matched) == gpus else 1)
PY

if [ -n "$tarball" ]; then
  wait "$build_pid"
  nccl_run() {
    LD_LIBRARY_PATH=/tmp/nccl-home/lib:${LD_LIBRARY_PATH:-} NCCL_NVLS_ENABLE=0 \
      timeout 60 /tmp/nccl-tests/build/all_reduce_perf -g 1 -b 8 -e 256M -f 4 -c 1 >"$out/all_reduce_perf.txt" 2>&1
    local rc=$?; cat "$out/all_reduce_perf.txt"
    "$py" - "$repo" "$out/all_reduce_perf.txt" <<'PY' || return 1
import importlib.util, sys
spec = importlib.util.spec_from_file_location("nccl_rules", sys.argv[1] + "/roles/nccl/filter_plugins/nccl_rules.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
print("nccl_perf_result:", mod.nccl_perf_result(open(sys.argv[2]).read()))
PY
    return $rc
  }
  step nccl-tests-1gpu nccl_run
fi
