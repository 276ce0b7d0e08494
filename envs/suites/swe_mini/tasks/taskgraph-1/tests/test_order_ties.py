from taskgraph import Graph, topological_order


def test_independent_tasks_in_alphabetical_order():
    assert topological_order(Graph().add("c").add("b").add("a")) == ["a", "b", "c"]


def test_diamond_is_deterministic():
    graph = Graph().add("d", "b", "c").add("b", "a").add("c", "a")
    assert topological_order(graph) == ["a", "b", "c", "d"]
