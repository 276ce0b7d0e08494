"""Task dependency graphs: ordering, levels, cycle reports and selections."""

from taskgraph.graph import CycleError, Graph
from taskgraph.order import find_cycle, levels, topological_order
from taskgraph.select import affected_by, ancestors, subgraph_for

__all__ = ["CycleError", "Graph", "affected_by", "ancestors", "find_cycle", "levels", "subgraph_for", "topological_order"]
