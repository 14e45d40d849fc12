#!/usr/bin/env bash
# Builds the container image from ./Dockerfile without a Docker engine (buildah) and runs the image
# tests (tests/image, with podman) against it. Run from the repository root inside the test venv,
# as root. Installs buildah, podman and debootstrap with apt-get where they are missing.
#
#   EVENTROUTER_IMAGE   tag to build (default localhost/eventrouter:test)
#   PYTHON_IMAGE        base image; default python:3.11-slim if it is already in the storage, or
#                       else a stand-in built by scripts/image-base.sh (no registry is reachable here)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image-test: run as root (buildah and podman run rootful here)" >&2; exit 1; }
tools=(buildah podman debootstrap)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A storage of its own, so nothing here touches other containers on the machine.
work=${EVENTROUTER_IMAGE_WORK:-/var/tmp/eventrouter-image}
mkdir -p "$work"
export CONTAINERS_STORAGE_CONF=$work/storage.conf CONTAINERS_CONF=$work/containers.conf
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "vfs"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
# crun cannot raise resource limits without CAP_SYS_RESOURCE, which sandboxes like this lack:
# give containers the limits this shell already has.
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
EOF

image=${EVENTROUTER_IMAGE:-localhost/eventrouter:test}
base=${PYTHON_IMAGE:-}
if [ -z "$base" ]; then
  if buildah inspect --type image python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base=localhost/python-standin:3.11-slim
    buildah inspect --type image "$base" >/dev/null 2>&1 || bash scripts/image-base.sh "$base"
  fi
fi

# pip in the builder must trust the same CAs as pip here (a proxy's CA, say): build-time mounts
# only, never a layer of the image.
pipconf=$work/pip.conf
cert=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}
printf '[global]\ncert = /run/host-ca.pem\n' >"$pipconf"
buildah rmi --prune >/dev/null 2>&1 || true  # earlier builds' dangling layers
# No layer cache: buildah's cache key for the final stage's RUN does not cover the wheels bind-mounted
# from the builder, so a cached layer kept the previous build's eventrouter (seen here).
started=$(date +%s)
buildah build --isolation chroot --network host --pull=never --layers=false \
  --build-arg "PYTHON_IMAGE=$base" --build-arg "REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -v "$cert:/run/host-ca.pem:ro" -v "$pipconf:/etc/pip.conf:ro" \
  -t "$image" . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
echo "image-test: built $image from $base in $(( $(date +%s) - started )) s"

EVENTROUTER_IMAGE=$image PYTHON_IMAGE=$base pytest -q -p no:cacheprovider -m image tests/image "$@"
