class CycleError(ValueError):
    def __init__(self, cycle: list[str]):
        super().__init__("dependency cycle: " + " -> ".join(cycle))
        self.cycle = cycle


class Graph:
    """Tasks and the tasks each one depends on."""

    def __init__(self):
        self._deps: dict[str, set[str]] = {}

    def add(self, task: str, *dependencies: str) -> "Graph":
        self._deps.setdefault(task, set()).update(dependencies)
        for dependency in dependencies:
            self._deps.setdefault(dependency, set())
        return self

    def nodes(self) -> set[str]:
        return set(self._deps)

    def deps(self, task: str) -> set[str]:
        return set(self._deps[task])

    def dependents(self, task: str) -> set[str]:
        return {node for node, deps in self._deps.items() if task in deps}
