import pytest

from taskgraph import CycleError, Graph, topological_order


def build_graph() -> Graph:
    return Graph().add("test", "compile").add("package", "compile", "test").add("compile", "fetch")


def test_dependencies_come_first():
    order = topological_order(build_graph())
    assert order.index("fetch") < order.index("compile") < order.index("test") < order.index("package")


def test_a_cycle_raises():
    with pytest.raises(CycleError) as caught:
        topological_order(Graph().add("a", "b").add("b", "a"))
    assert caught.value.cycle in (["a", "b", "a"], ["b", "a", "b"])


def test_empty_graph():
    assert topological_order(Graph()) == []
