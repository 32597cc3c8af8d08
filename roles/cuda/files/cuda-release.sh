#!/bin/bash
# The CUDA toolkit release installed on this host ("13.0.88"), from the first toolkit directory given that
# holds version.json (CUDA >= 11.1), version.txt (older) or bin/nvcc (images that ship neither file, e.g. the
# H200 device image's CUDA 13.0), else the nvcc on PATH. Prints nothing when there is no toolkit.
# Used by roles/cuda (verify the install) and roles/nccl (pick the NCCL build for the release).
set -uo pipefail
for home in "$@"; do
  if [ -r "$home/version.json" ]; then
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["cuda"]["version"])' "$home/version.json"
    exit 0
  fi
  if [ -r "$home/version.txt" ]; then sed -n 's/^CUDA Version \([0-9.]*\).*/\1/p' "$home/version.txt"; exit 0; fi
  if [ -x "$home/bin/nvcc" ]; then "$home/bin/nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p'; exit 0; fi
done
nvcc="$(command -v nvcc || true)"
[ -n "$nvcc" ] && "$nvcc" --version | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p'
exit 0
