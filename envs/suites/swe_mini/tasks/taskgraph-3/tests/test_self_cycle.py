import pytest

from taskgraph import CycleError, Graph, find_cycle, topological_order


def test_self_dependency_is_reported():
    with pytest.raises(CycleError) as caught:
        topological_order(Graph().add("a", "a"))
    assert caught.value.cycle == ["a", "a"]


def test_find_cycle_sees_self_loops():
    assert find_cycle(Graph().add("b").add("a", "a")) == ["a", "a"]


def test_acyclic_graph_has_no_cycle():
    assert find_cycle(Graph().add("b", "a")) == []
