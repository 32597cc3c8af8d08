#!/usr/bin/env bash
# Builds .wheelhouse/: the deepfleet runtime and every dependency as wheels, for hosts that cannot reach a
# package registry (the air-gapped on-prem case; the lab hosts too). The hosts run Debian bookworm's
# python3.11 on x86_64, like this controller, so wheels resolved here install there with
# `pip install --no-index --find-links`. CPU torch comes from this machine's pip find-links. The pkcs11 extra's
# wheels come along (python-pkcs11: inference_runtime_pkcs11 installs it on hosts serving through a token).
# Rebuilt only when its inputs (runtime sources, this script, the torch spec) change.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELHOUSE:-.wheelhouse}
PIP=${PIP:-.venv/bin/pip}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.*}

inputs_hash() {
  { echo "$TORCH_SPEC"; cat "$0";
    find runtime -path '*.egg-info' -prune -o -path '*/__pycache__' -prune -o -type f \
      \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name '*.j2' -o -name '*.json' \) -print0 \
      | sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1
}

want=$(inputs_hash)
if [ -f "$OUT/.inputs" ] && [ "$(cat "$OUT/.inputs")" = "$want" ]; then
  echo "==> $OUT up to date"
  exit 0
fi

echo "==> building $OUT (runtime + dependencies as wheels)"
tmp="$OUT.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
# Keep unchanged dependency wheels: only the runtime wheel is rebuilt from source every time.
if [ -d "$OUT" ]; then
  find "$OUT" -maxdepth 1 -name '*.whl' ! -name 'deepfleet_runtime-*' -exec cp -l {} "$tmp/" \;
fi
# (pip warns about every project absent from the file:// extra indexes: noise, filtered.)
"$PIP" wheel -q --wheel-dir "$tmp" --find-links "$tmp" "$TORCH_SPEC" "./runtime[pkcs11]" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# The build leaves a build/ directory in the source tree; the wheel is all we need.
rm -rf runtime/build
# Exactly one wheel per project, so the hosts' unpinned install resolves to what was tested here.
dups=$(find "$tmp" -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "error: several wheels for: $dups" >&2
  exit 1
fi
# Swap in the new wheels; other content of $OUT (the controller's model cache, models/) stays.
mkdir -p "$OUT"
find "$OUT" -maxdepth 1 -name '*.whl' -delete
mv "$tmp"/*.whl "$OUT"/
rmdir "$tmp"
# One archive for the hosts: one transfer instead of one per wheel (the wheels are compressed already).
tar -cf "$OUT/wheelhouse.tar" -C "$OUT" $(cd "$OUT" && ls ./*.whl)
echo "$want" > "$OUT/.inputs"
echo "==> $OUT: $(find "$OUT" -name '*.whl' | wc -l) wheels, archive $(du -h "$OUT/wheelhouse.tar" | cut -f1)"
