#!/usr/bin/env bash
# Push the base image, and any locally built task images named as arguments, to the image registry
# (MEGAFLOW_IMAGE_REGISTRY, default the local one bootstrap starts on 127.0.0.1:5000). Each lands under its own
# name, e.g. megaflow/base:bookworm -> 127.0.0.1:5000/megaflow/base:bookworm; a task then names that reference as
# its `image` and env workers pull it when their host lacks it. Usage: push-images.sh [IMAGE...]
set -euo pipefail

REGISTRY=${MEGAFLOW_IMAGE_REGISTRY:-127.0.0.1:5000}
BASE_IMAGE=${MEGAFLOW_BASE_IMAGE:-megaflow/base:bookworm}

for image in "$BASE_IMAGE" "$@"; do  # all of them present before any is pushed
  docker image inspect "$image" >/dev/null 2>&1 || { echo "megaflow: no local image $image" >&2; exit 2; }
done
for image in "$BASE_IMAGE" "$@"; do
  name=${image#"$REGISTRY"/}
  target="$REGISTRY/$name"
  docker tag "$image" "$target"
  docker push -q "$target" >/dev/null
  echo "==> pushed $image as $target"
done
