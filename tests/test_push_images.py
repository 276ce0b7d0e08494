"""``make push-images`` (deploy/push-images.sh), against a stand-in ``docker`` that records what it was asked: each
image lands under its own name in the registry, a reference that names the registry already is not prefixed twice,
and a missing image stops the script before anything is pushed. (Run for real against the local registry:
``make push-images`` pushes megaflow/base:bookworm to 127.0.0.1:5000.)"""

import os
import subprocess

from django.conf import settings

SCRIPT = settings.BASE_DIR / "deploy" / "push-images.sh"
FAKE_DOCKER = """#!/usr/bin/env bash
echo "$*" >> "$DOCKER_LOG"
if [ "$1 $2" = "image inspect" ]; then case "$3" in *ghost*) exit 1;; esac; fi
exit 0
"""


def push(tmp_path, *images: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "docker").write_text(FAKE_DOCKER)
    (tmp_path / "docker").chmod(0o755)
    log = tmp_path / "docker.log"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DOCKER_LOG": str(log),
           "MEGAFLOW_IMAGE_REGISTRY": "127.0.0.1:5999", "MEGAFLOW_BASE_IMAGE": "megaflow/base:bookworm"}  # fmt: skip
    result = subprocess.run(["bash", str(SCRIPT), *images], env=env, capture_output=True, text=True, timeout=30)
    return result, log.read_text().splitlines() if log.exists() else []


def test_push_images_tags_and_pushes_each_image_under_its_own_name(tmp_path):
    result, calls = push(tmp_path, "megaflow/task-1:v1", "127.0.0.1:5999/megaflow/task-2:v1")
    assert result.returncode == 0, result.stderr
    pushed = [call.split()[-1] for call in calls if call.startswith("push")]
    assert pushed == ["127.0.0.1:5999/megaflow/base:bookworm", "127.0.0.1:5999/megaflow/task-1:v1",
                      "127.0.0.1:5999/megaflow/task-2:v1"]  # fmt: skip
    assert "tag megaflow/task-1:v1 127.0.0.1:5999/megaflow/task-1:v1" in calls


def test_push_images_stops_on_a_missing_image_before_pushing_anything(tmp_path):
    result, calls = push(tmp_path, "megaflow/ghost:never")
    assert result.returncode == 2 and "no local image megaflow/ghost:never" in result.stderr
    assert not [call for call in calls if call.startswith(("push", "tag"))]
