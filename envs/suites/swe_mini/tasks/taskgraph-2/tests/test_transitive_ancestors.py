from taskgraph import Graph, ancestors, subgraph_for


def chain() -> Graph:
    return Graph().add("deploy", "test").add("test", "compile").add("compile", "fetch").add("lint")


def test_ancestors_are_transitive():
    assert ancestors(chain(), "deploy") == {"test", "compile", "fetch"}


def test_subgraph_keeps_indirect_dependencies():
    assert subgraph_for(chain(), ["deploy"]).nodes() == {"deploy", "test", "compile", "fetch"}
