"""Backends by name, one registry per service (DESIGN.md): adding a backend is adding one module.

A service's backends live in ``<package>/<name>_backend.py`` (agents: ``<name>_agent.py``) and register their
class with the registry's decorator; configuration selects one by name, and its module is imported only then
(torch, say, is loaded only by the workers that use the ``hf`` backend). A name's hyphens are its module's
underscores: the ``mini-swe-agent`` agent is ``agents/mini_swe_agent_agent.py``.
"""

from __future__ import annotations

import importlib
from pathlib import Path


class BackendRegistry:
    def __init__(self, package: str, directory: Path, suffix: str = "_backend"):
        self.package = package
        self.directory = directory
        self.suffix = suffix
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: make a backend selectable by ``name``."""

        def decorate(cls: type) -> type:
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        stems = (path.stem.removesuffix(self.suffix) for path in self.directory.glob(f"*{self.suffix}.py"))
        return sorted(stem.replace("_", "-") for stem in stems)

    def load(self, name: str) -> type | None:
        """The backend class named ``name``, or None when no such backend exists."""
        if name not in self.names():
            return None
        importlib.import_module(f"{self.package}.{name.replace('-', '_')}{self.suffix}")
        return self.classes[name]
