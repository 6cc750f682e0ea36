"""The layout holds: wsgate's modules import one way, with no cycle (a newcomer can read
them bottom-up), and nothing imports the twistd entry point."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "wsgate")


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield module.removesuffix(".__init__"), path


def _type_checking_only(node):
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(path, module, known):
    """The wsgate modules *module* imports at run time (function-level ones included)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

    def visit(node):
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            names = []
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph():
    modules = dict(_modules())
    return {module: _imports(path, module, modules) for module, path in modules.items()}


def _cycle(graph):
    state, stack = {}, []

    def walk(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                found = walk(other)
                if found:
                    return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = walk(module)
            if found:
                return found
    return None


def test_wsgate_modules_import_one_way_without_a_cycle():
    # A package's __init__ importing its own submodules is how a package re-exports,
    # not a cycle of the design: judge the graph without those edges.
    imports = graph()
    for module, deps in imports.items():
        imports[module] = {d for d in deps if not d.startswith(module + ".")}
    assert _cycle(imports) is None, " -> ".join(_cycle(imports))


def test_nothing_imports_the_twistd_entry_point():
    assert [m for m, deps in graph().items() if "wsgate.tap" in deps] == []


def test_every_package_is_installed():
    """setup.cfg lists every package of wsgate: a package left out works from the source
    tree (and in tests run with PYTHONPATH) but is missing from `pip install .`, the
    Debian package and `make run`."""
    import configparser

    root = os.path.join(os.path.dirname(__file__), "..")
    setup = configparser.ConfigParser()
    setup.read(os.path.join(root, "setup.cfg"))
    listed = set(setup["options"]["packages"].split())
    found = set()
    for folder, _, files in os.walk(os.path.join(root, "wsgate")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, root).replace(os.sep, "."))
    assert found - listed == set(), "add these to setup.cfg [options] packages"
