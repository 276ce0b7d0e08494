"""Dataset bundles: a ``.tar.gz`` holding ``tasks.jsonl`` and the repository archives it names, the layout
``megaflow load-dataset`` reads from disk, so a trainer on another machine can bring its own repositories over
REST.

A bundle is untrusted input. It is read as a stream (never seeked, never loaded whole), and refused with the
member's name and the reason for: a path that is absolute or climbs out (``..``), a link of either kind, anything
but files and directories, a member over ``MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES``, more than
``MEGAFLOW_BUNDLE_MAX_BYTES`` unpacked in all, more than ``MEGAFLOW_BUNDLE_MAX_MEMBERS`` members.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from django.conf import settings

TASKS_FILE = "tasks.jsonl"
COPY_CHUNK = 1 << 20


class BundleError(ValueError):
    """The bundle is refused; the message names the member and the reason."""


def unpack(fileobj: BinaryIO, into: Path) -> Path:
    """Unpack the bundle under ``into`` and return the directory holding its ``tasks.jsonl`` (the top level, or
    the one directory everything is in)."""
    total, members = 0, 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|gz") as tar:
            for member in tar:
                members += 1
                if members > settings.MEGAFLOW_BUNDLE_MAX_MEMBERS:
                    raise BundleError(f"more than {settings.MEGAFLOW_BUNDLE_MAX_MEMBERS} members")
                target = into.joinpath(*_safe_parts(member))
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if member.size > settings.MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES:
                    raise BundleError(
                        f"{member.name}: {member.size} bytes, over {settings.MEGAFLOW_BUNDLE_MEMBER_MAX_BYTES}"
                    )
                total += member.size
                if total > settings.MEGAFLOW_BUNDLE_MAX_BYTES:
                    raise BundleError(f"more than {settings.MEGAFLOW_BUNDLE_MAX_BYTES} bytes unpacked")
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, COPY_CHUNK)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise BundleError(f"not a readable .tar.gz: {error}") from None
    return _root(into)


def _safe_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise BundleError(f"{member.name}: the path leaves the bundle")
    if member.issym() or member.islnk():
        raise BundleError(f"{member.name}: links are not allowed")
    if not (member.isfile() or member.isdir()):
        raise BundleError(f"{member.name}: only files and directories are allowed")
    parts = tuple(part for part in path.parts if part not in ("", "."))
    if not parts and not member.isdir():
        raise BundleError(f"{member.name!r}: not a file name")
    return parts


def _root(into: Path) -> Path:
    if (into / TASKS_FILE).is_file():
        return into
    entries = list(into.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / TASKS_FILE).is_file():
        return entries[0]
    raise BundleError(f"no {TASKS_FILE} at the top of the bundle (or in its one top-level directory)")
