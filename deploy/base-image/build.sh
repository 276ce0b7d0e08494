#!/usr/bin/env bash
# Build MegaFlow's base environment image without a registry: debootstrap a minimal Debian bookworm tree with
# python3, git, pytest and patch, then `docker import` it. Usage: build.sh [TAG] (default megaflow/base:bookworm).
set -euo pipefail

TAG=${1:-megaflow/base:bookworm}
MIRROR=${MEGAFLOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-pytest,git,patch,procps,ca-certificates

rootfs=$(mktemp -d /tmp/megaflow-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap bookworm ($PACKAGES) from $MIRROR into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR"

# Smaller image, and nothing that would let a task reach a package mirror it cannot reach anyway.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/*
mkdir -p "$rootfs/testbed"

echo "docker import as $TAG"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1' \
  --change 'WORKDIR /testbed' \
  --change 'CMD ["/bin/bash"]' \
  --change 'LABEL megaflow.base=bookworm' \
  - "$TAG"
docker run --rm --network none "$TAG" sh -c 'python3 --version && git --version && python3 -m pytest --version'
