#!/usr/bin/env bash
# Build deploy/Containerfile on a machine that can reach package registries but no container registry,
# then run the smoke search inside the image. Run as root from the repository root, with podman,
# buildah's chroot isolation (podman build --isolation chroot) and debootstrap installed
# (Debian: apt-get install podman buildah debootstrap runc), and BSS_DATA_DIR set:
#
#   BSS_DATA_DIR=../shared/data bash deploy/offline-image.sh
#
# No base image can be pulled, so the layers under the project are built here instead:
#   1. Debian bookworm (Python 3.11) from Debian's packages with debootstrap, imported as an image;
#   2. deploy/ray-standin.Containerfile on it: Ray at constraints.txt's version, laid out like
#      rayproject/ray (user ray, its own Python first on PATH), on the CPU;
#   3. deploy/Containerfile itself, unchanged, with BASE_IMAGE set to the stand-in and TORCH_INDEX to a
#      local PEP 503 index of the CPU build of torch (the one `pip download torch==<pin>` finds here);
#   4. the smoke search in a container of that image: the data mounted read-only at /data (BSS_DATA_DIR in
#      the image), results/ mounted from $WORK/results.
# What this cannot show: the CUDA image. rayproject/ray:<ray>-py311-cu128 and the cu128 build of torch
# are not reachable from here; the recipe is the same with the defaults of deploy/Containerfile.
set -euo pipefail

WORK=${WORK:-build/image}
TAG=${TAG:-localhost/bss-search:0.1.0-ray$(sed -n 's/^ray==//p' constraints.txt)-py311-cpu}
: "${BSS_DATA_DIR:?set BSS_DATA_DIR to the folder holding mnist/ and fashion-mnist/}"
DATA=$(cd "$BSS_DATA_DIR" && pwd)
RAY_VERSION=$(sed -n 's/^ray==//p' constraints.txt)
TORCH_VERSION=$(sed -n 's/^torch==//p' constraints.txt)
DEBIAN_IMAGE=localhost/debian:bookworm-py311
STANDIN=localhost/ray-standin:${RAY_VERSION}-py311-cpu
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
log() { echo "[offline-image $(date -u +%H:%M:%S)] $*"; }

# Behind a TLS-intercepting proxy (as on the machine this was written on) pip inside the builds needs the
# host's CA bundle, which pip's own bundle lacks: PIP_CERT, or the cert the host's pip is configured with,
# is mounted into every build step with a pip.conf naming it (mounts stay out of the image).
CERT=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
BUILD_MOUNTS=()
if [ -n "$CERT" ]; then
  printf '[global]\ncert = /etc/pip-host-ca.crt\n' >"$WORK/pip.conf"
  BUILD_MOUNTS=(--volume "$CERT:/etc/pip-host-ca.crt:ro" --volume "$WORK/pip.conf:/etc/pip.conf:ro")
fi

# 1. Debian from its packages (python3-venv: the stand-in's own environment).
if ! podman image exists "$DEBIAN_IMAGE"; then
  log "debootstrap bookworm -> $DEBIAN_IMAGE"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import - "$DEBIAN_IMAGE"
  rm -rf "$WORK/rootfs"
fi

# 2. Ray's image, stood in for. Chroot isolation: builds need no OCI runtime (none may be usable in a
# container sandbox), and --network host reaches the package registry as the host does.
log "ray stand-in -> $STANDIN"
podman build --isolation chroot --network host "${BUILD_MOUNTS[@]}" -f deploy/ray-standin.Containerfile \
  --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" -t "$STANDIN" .

# 3. TORCH_INDEX: the CPU torch wheel and its dependencies, as a PEP 503 simple index.
log "torch $TORCH_VERSION (CPU) index"
rm -rf "$WORK/wheels" "$WORK/torch-index"
pip download --quiet --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
  -c constraints.txt "torch==$TORCH_VERSION" -d "$WORK/wheels"
python3 - "$WORK/wheels" "$WORK/torch-index" <<'EOF'
import html, re, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    (index / project).mkdir(parents=True, exist_ok=True)
    (index / project / wheel.name).write_bytes(wheel.read_bytes())
for folder in index.iterdir():
    links = "".join(f'<a href="{html.escape(w.name)}">{html.escape(w.name)}</a>\n' for w in sorted(folder.glob("*.whl")))
    (folder / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
EOF

# 4. The project's image, from its own Containerfile.
log "deploy/Containerfile -> $TAG"
podman build --isolation chroot --network host "${BUILD_MOUNTS[@]}" -f deploy/Containerfile \
  --build-arg BASE_IMAGE="$STANDIN" --build-arg TORCH_INDEX=file:///torch-index \
  --volume "$WORK/torch-index:/torch-index:ro" -t "$TAG" .
podman image inspect "$TAG" --format '{{.Id}} {{.Size}}' | sed 's/^/image: /'

# 5. The smoke search inside it, with no network: a local Ray needs only loopback. runc with explicit
# limits: in a sandbox without CAP_SYS_RESOURCE the OCI runtime may not set podman's default
# RLIMIT_NOFILE / RLIMIT_NPROC. Ray wants /dev/shm of about 30% of RAM for its object store (a tmpfs
# limit, not memory taken).
log "smoke search in $TAG"
rm -rf "$WORK/results" && mkdir -p "$WORK/results" && chown 1000:100 "$WORK/results"
podman ${PODMAN_RUNTIME:---runtime runc} run --rm --network none --shm-size 8g \
  ${PODMAN_LIMITS:---ulimit nofile=4096:4096 --ulimit nproc=4096:4096} \
  --volume "$DATA:/data:ro" --volume "$WORK/results:/home/ray/bss-search/results" \
  "$TAG" python search/run.py --config configs/smoke.yaml
log "done: $WORK/results/smoke"
