from taskgraph import Graph, levels


def test_a_task_comes_after_its_deepest_dependency():
    graph = Graph().add("test", "compile").add("package", "compile", "test")
    assert levels(graph) == [["compile"], ["test"], ["package"]]


def test_independent_tasks_share_level_zero():
    assert levels(Graph().add("b").add("a")) == [["a", "b"]]
