"""Docker image references: parsed and checked against the grammar of the distribution project
(``[registry[:port]/]path[:tag][@digest]``), without touching a daemon. The task format refuses a malformed
reference when a dataset is loaded; the env worker uses the registry part to decide whether it may pull.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9A-Fa-f:]+\])(?::[0-9]{{1,5}})?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?"
)
MAX_NAME = 255


class BadReference(ValueError):
    """Not an image reference; the message says what is wrong."""


@dataclass(frozen=True)
class ImageReference:
    registry: str  # "" when the reference names none: an image of the local daemon (or Docker Hub)
    repository: str  # registry + path, what ``docker pull`` takes without the tag
    tag: str
    digest: str

    @property
    def pullable(self) -> bool:
        """Whether the reference names a registry to pull from (Docker Hub is not reachable from a sandbox host
        without one, and an unqualified name is taken to be a locally built image)."""
        return bool(self.registry)


def parse(reference: str) -> ImageReference:
    """The parts of ``reference``; ``BadReference`` says why it is not one."""
    if not reference or reference != reference.strip():
        raise BadReference("must be a non-empty image reference without surrounding spaces")
    match = _REFERENCE.fullmatch(reference)
    if match is None:
        raise BadReference(
            f"{reference!r} is not an image reference ([registry[:port]/]name[:tag][@digest], lower-case name)"
        )
    domain, path = match["domain"] or "", match["path"]
    if domain and not ("." in domain or ":" in domain or domain == "localhost" or domain.startswith("[")):
        # Docker's rule: a first component without a dot, a port or "localhost" is part of the path.
        if not re.fullmatch(_COMPONENT, domain):
            raise BadReference(f"{reference!r}: {domain!r} is neither a registry host nor a lower-case name")
        path, domain = f"{domain}/{path}", ""
    name = f"{domain}/{path}" if domain else path
    if len(name) > MAX_NAME:
        raise BadReference(f"{reference!r}: the name is longer than {MAX_NAME} characters")
    tag = match["tag"] or ("" if match["digest"] else "latest")
    return ImageReference(registry=domain, repository=name, tag=tag, digest=match["digest"] or "")
