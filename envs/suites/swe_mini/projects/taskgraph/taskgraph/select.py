from taskgraph.graph import Graph


def ancestors(graph: Graph, task: str) -> set[str]:
    """Everything ``task`` needs, directly or through other tasks."""
    found: set[str] = set()
    stack = list(graph.deps(task))
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(graph.deps(node))
    return found


def subgraph_for(graph: Graph, targets: list[str]) -> Graph:
    """The part of the graph needed to build ``targets``."""
    keep = set(targets)
    for target in targets:
        keep |= ancestors(graph, target)
    sub = Graph()
    for node in keep:
        sub.add(node, *graph.deps(node))
    return sub


def affected_by(graph: Graph, changed: set[str]) -> set[str]:
    """The changed tasks and every task that depends on them, directly or not."""
    found = set(changed)
    stack = list(changed)
    while stack:
        for dependent in graph.dependents(stack.pop()):
            if dependent not in found:
                found.add(dependent)
                stack.append(dependent)
    return found
