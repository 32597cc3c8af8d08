#!/usr/bin/env bash
# make image-test: the image `make image` built serves the tiny model and answers a completion. `podman run` is
# refused setrlimit in this sandbox, so the image's root filesystem (buildah mount) runs under systemd-nspawn
# with the image's own config: its user, working directory, environment and entrypoint. The server listens on
# a free loopback port; the model folder is bound read-only at /models. Everything is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD/runtime:$PWD${PYTHONPATH:+:$PYTHONPATH}"
IMAGE=localhost/$("$PY" -c 'import deepfleet, deepfleet.defaults as d; print(f"{d.IMAGE_REPOSITORY}:{deepfleet.__version__}")')
MODEL_DIR=${MODEL_DIR:-.wheelhouse/models/tiny-qwen2}
MODEL=$(basename "$MODEL_DIR")
LOG=build/image-serve.log

buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || { echo "error: $IMAGE not built (make image)" >&2; exit 1; }
[ -d "$MODEL_DIR" ] || { echo "error: no model at $MODEL_DIR (make lab fetches the tiny model)" >&2; exit 1; }

field() { buildah inspect --type image --format "$1" "$IMAGE"; }
user=$(field '{{.OCIv1.Config.User}}')
workdir=$(field '{{.OCIv1.Config.WorkingDir}}')
entrypoint=$(field '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}')
setenv=()
while IFS= read -r kv; do [ -n "$kv" ] && setenv+=("--setenv=$kv"); done < <(field '{{range .OCIv1.Config.Env}}{{println .}}{{end}}')
port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

ctr=$(buildah from -q "$IMAGE")
mnt=$(buildah mount "$ctr")
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  buildah umount "$ctr" >/dev/null 2>&1 || true
  buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf build/image-model
}
trap cleanup EXIT

# a readable copy for the image's non-root user (the controller's model cache is root-only)
model_copy=build/image-model/$MODEL
rm -rf build/image-model
mkdir -p build/image-model
cp -r "$MODEL_DIR" "$model_copy"
chmod -R a+rX build/image-model
t0=$(date +%s)
# shellcheck disable=SC2086  # the entrypoint is a word list
systemd-nspawn -q --register=no --keep-unit --link-journal=no --resolv-conf=off --console=pipe --as-pid2 -D "$mnt" --user="${user%%:*}" --chdir="$workdir" "${setenv[@]}" \
  --bind-ro="$PWD/$model_copy:/models/$MODEL" \
  $entrypoint serve "/models/$MODEL" --host 127.0.0.1 --port "$port" >"$LOG" 2>&1 &
pid=$!
echo "==> $IMAGE: $entrypoint serve /models/$MODEL on 127.0.0.1:$port (user $user, nspawn pid $pid)"
for _ in $(seq 300); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { echo "error: the server exited:" >&2; tail -20 "$LOG" >&2; exit 1; }
  sleep 1
done
ready=$(( $(date +%s) - t0 ))
body=$(printf '{"model": "%s", "prompt": "The fleet", "max_tokens": 4, "temperature": 0}' "$MODEL")
answer=$(curl -fsS -m 60 -H 'Content-Type: application/json' -d "$body" "http://127.0.0.1:$port/v1/completions")
"$PY" - "$answer" "$MODEL" <<'EOF'
import json, sys
answer, model = json.loads(sys.argv[1]), sys.argv[2]
assert answer["model"] == model, answer
assert isinstance(answer["choices"][0]["text"], str), answer
assert 0 < answer["usage"]["completion_tokens"] <= 4, answer
print(f"==> answered: {answer['choices'][0]['text']!r} ({answer['usage']['completion_tokens']} tokens)")
EOF
# the server runs as the image's user (10001), not as root
uids=$(ps -eo uid=,args= | awk -v port="$port" '$0 ~ ("serve /models/.* --port " port "$") && $0 !~ /systemd-nspawn/ {print $1}' | sort -u)
[ "$uids" = "${user%%:*}" ] || { echo "error: server uid(s) '$uids', image user $user" >&2; exit 1; }
echo "==> ready after ${ready} s as uid $uids; log $LOG"
