"""A real image registry for tests and benchmarks (Debian's ``docker-registry``, the distribution project's
registry), on 127.0.0.1 only, with its storage under a directory of its own; and tiny task images pushed to it.

Docker treats registries on 127.0.0.0/8 as insecure (plain HTTP) without configuration, so any daemon on this
machine pulls from it. Tiny images are the base image plus one file of random bytes (so each adds a known
amount, and pulls move real bytes) and a label, committed and pushed, then removed locally: they exist only in
the registry.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

import docker

CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


class Registry:
    """``docker-registry serve`` on 127.0.0.1:``port``; ``stop`` and ``start`` again keep its images."""

    def __init__(self, port: int, root: Path):
        self.port, self.root = port, root
        self.address = f"127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(CONFIG.format(root=self.root / "data", port=self.port))
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=(self.root / "registry.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.answers():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not start on {self.address}; see {self.root / 'registry.log'}")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def push_tiny_images(
    registry: str, names: list[str], base: str, payload_bytes: int, client: docker.DockerClient | None = None
) -> list[str]:
    """Build ``base`` + a file of ``payload_bytes`` random bytes + a label for each name, push each to
    ``registry`` as ``<registry>/megaflow-test/<name>:v1``, remove them locally; returns the references."""
    client = client or docker.from_env()
    references = []
    for name in names:
        reference = f"{registry}/megaflow-test/{name}:v1"
        container = client.containers.create(base, command=["true"], labels={"megaflow.tiny-image": name})
        try:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                data = os.urandom(payload_bytes)
                info = tarfile.TarInfo(f"megaflow-payload-{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            container.put_archive("/", buffer.getvalue())
            image = container.commit(changes=f"LABEL megaflow.tiny-image={name}")
        finally:
            container.remove(force=True)
        repository, tag = reference.rsplit(":", 1)
        image.tag(repository, tag)
        for event in client.api.push(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise RuntimeError(f"pushing {reference}: {event['error']}")
        remove_local([reference, image.id], client)
        references.append(reference)
    return references


def remove_local(references: list[str], client: docker.DockerClient | None = None) -> None:
    """Remove these images from the daemon (a test starts with them only in the registry)."""
    client = client or docker.from_env()
    for reference in references:
        try:
            client.images.remove(reference, force=True)
        except docker.errors.ImageNotFound:
            pass
