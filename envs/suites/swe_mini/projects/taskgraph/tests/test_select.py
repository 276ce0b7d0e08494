from taskgraph import Graph, affected_by, ancestors, subgraph_for


def build_graph() -> Graph:
    return Graph().add("lint").add("test", "compile").add("compile", "fetch").add("docs")


def test_ancestors():
    assert ancestors(build_graph(), "compile") == {"fetch"}


def test_subgraph_drops_unrelated_tasks():
    assert "lint" not in subgraph_for(build_graph(), ["compile"]).nodes()


def test_affected_by():
    assert affected_by(build_graph(), {"fetch"}) == {"fetch", "compile", "test"}
