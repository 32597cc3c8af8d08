#!/usr/bin/env bash
# make image: builds runtime/Dockerfile with buildah (chroot isolation: no daemon, works in this sandbox) without
# a registry. The base is a Debian bookworm root filesystem made here (the lab's debootstrapped one, cached;
# debootstrap again if missing) imported as localhost/deepfleet/base:bookworm; the Python packages come from
# .wheelhouse (scripts/build-wheelhouse.sh: CPU torch and the runtime), so only Debian's apt is reached.
# The image is tagged localhost/<deepfleet.defaults.IMAGE_REPOSITORY>:<runtime version>: the name infra's
# workload runs from its registry. GPU sites build the same file from nvidia/cuda (the default BASE_IMAGE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/runtime:$PWD${PYTHONPATH:+:$PYTHONPATH}"
IMAGE=localhost/$("$PY" -c 'import deepfleet, deepfleet.defaults as d; print(f"{d.IMAGE_REPOSITORY}:{deepfleet.__version__}")')
BASE=localhost/deepfleet/base:bookworm
CONTEXT=build/image

command -v buildah >/dev/null || { echo "error: buildah missing (Debian: apt-get install buildah)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: buildah's chroot isolation needs root here" >&2; exit 1; }

t0=$(date +%s)
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  rootfs=$("$PY" -c 'from lab import rootfs; print(rootfs.base_dir())')
  if [ ! -d "$rootfs" ]; then
    rootfs=build/base-rootfs
    pkgs=$("$PY" -c 'from lab.config import ROOTFS_PACKAGES as p; print(",".join(p))')
    echo "==> base: debootstrap bookworm into $rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include="$pkgs" bookworm "$rootfs" http://deb.debian.org/debian
  fi
  echo "==> base: importing $rootfs as $BASE"
  mkdir -p build
  tar -C "$rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -cf build/base-rootfs.tar .
  ctr=$(buildah from scratch)
  buildah add "$ctr" build/base-rootfs.tar / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  buildah commit --rm -q "$ctr" "$BASE" >/dev/null
  rm -f build/base-rootfs.tar
fi

scripts/build-wheelhouse.sh
echo "==> context: runtime sources + .wheelhouse wheels in $CONTEXT"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/wheels"
cp runtime/pyproject.toml runtime/README.md "$CONTEXT/"
cp -r runtime/deepfleet "$CONTEXT/deepfleet"
find "$CONTEXT/deepfleet" -name __pycache__ -prune -exec rm -rf {} +
cp -l .wheelhouse/*.whl "$CONTEXT/wheels/" 2>/dev/null || cp .wheelhouse/*.whl "$CONTEXT/wheels/"

echo "==> build: $IMAGE (runtime/Dockerfile, BASE_IMAGE=$BASE, offline pip)"
buildah bud --isolation chroot --format docker --layers=false \
  --build-arg BASE_IMAGE="$BASE" --build-arg PIP_NO_INDEX=1 --build-arg EXTRAS= \
  -f runtime/Dockerfile -t "$IMAGE" "$CONTEXT"
rm -rf "$CONTEXT"
echo "==> $IMAGE built in $(( $(date +%s) - t0 )) s: $(buildah images --format '{{.Size}}' "$IMAGE")"
