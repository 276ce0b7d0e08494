import heapq

from taskgraph.graph import CycleError, Graph


def topological_order(graph: Graph) -> list[str]:
    """Every task after all of its dependencies. Among tasks that are ready at the same time the
    alphabetically first comes first, so the order is the same on every run."""
    waiting = {node: len(graph.deps(node)) for node in graph.nodes()}
    ready = [node for node, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        for dependent in graph.dependents(node):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, dependent)
    if len(order) != len(waiting):
        raise CycleError(find_cycle(graph))
    return order


def find_cycle(graph: Graph) -> list[str]:
    """One cycle as a closed path ['a', 'b', 'a'], or [] if the graph has none. A task that depends on
    itself is the cycle ['a', 'a']."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "active"
        path.append(node)
        for dependency in sorted(graph.deps(node)):
            if state.get(dependency) == "active":
                return path[path.index(dependency):] + [dependency]
            if dependency not in state:
                if cycle := visit(dependency):
                    return cycle
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph.nodes()):
        if node not in state:
            if cycle := visit(node):
                return cycle
    return []


def levels(graph: Graph) -> list[list[str]]:
    """Tasks grouped so that each group only depends on earlier groups: level 0 has no dependencies, and a
    task sits one level after its deepest dependency. Each level is sorted."""
    level: dict[str, int] = {}
    for node in topological_order(graph):
        deps = graph.deps(node)
        level[node] = 1 + max(level[dep] for dep in deps) if deps else 0
    grouped: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for node, depth in level.items():
        grouped[depth].append(node)
    return [sorted(group) for group in grouped]
