"""The package's layers (docs/architecture.md), read from the source with ast so they cannot regress: every
import points down or sideways within its own layer, never up; no module imports itself back through others;
the package never imports itself inside a function (which would hide a circle); the root stays small."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "siglip_jax")

# Lowest first. A module may import its own layer and those to its left, never one to its right.
LAYERS = ("config", "runtime", "data", "models", "losses", "io", "inference", "evaluation", "training")
MAX_ROOT_MODULES = 8


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every .py file of the package (a package is its __init__)."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.join(PACKAGE, "..")).removesuffix(".py")
                modules[relative.replace(os.sep, ".").removesuffix(".__init__")] = path
    return modules


def _imports(modules: dict[str, str]) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the package modules it imports at its top level}, [function-level imports of the package])."""
    graph, nested = {}, []
    for module, path in modules.items():
        tree = ast.parse(open(path).read())
        top_level = {id(node) for node in tree.body}
        found = graph.setdefault(module, set())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "siglip_jax":
                # `from a.b import c` imports the module a.b.c where it exists, else a name of a.b
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "siglip_jax"]
            if targets and id(node) not in top_level:
                nested.append(f"{os.path.relpath(path, PACKAGE)}:{node.lineno} imports {', '.join(targets)} "
                              "inside a function; import it at the top (a circle is the usual reason: break it)")
            found.update(target for target in targets if target != module)
    return graph, nested


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "siglip_jax"


def _backward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imported in sorted(graph.items()):
        layer = _layer(module)
        if layer == "siglip_jax":
            continue
        if layer not in LAYERS:
            problems.append(f"{module} is in no layer; add {layer!r} to LAYERS in tests/test_import_graph.py")
            continue
        for other in sorted(imported):
            other_layer = _layer(other)
            if other_layer in LAYERS and LAYERS.index(other_layer) > LAYERS.index(layer):
                problems.append(f"{module} ({layer}) imports {other} ({other_layer}), a layer above it")
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, each once (depth-first search, one path per back edge)."""
    cycles, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_imports_point_down_the_layers():
    graph, _ = _imports(_modules())
    assert _backward_imports(graph) == []


def test_no_import_circles():
    graph, _ = _imports(_modules())
    assert _cycles(graph) == []


def test_the_package_is_imported_only_at_the_top_of_modules():
    _, nested = _imports(_modules())
    assert nested == []


def test_the_root_holds_few_modules_and_each_subpackage_says_what_it_is():
    root_modules = [name for name in os.listdir(PACKAGE) if name.endswith(".py")]
    assert len(root_modules) <= MAX_ROOT_MODULES, sorted(root_modules)
    for layer in LAYERS[1:]:
        init = os.path.join(PACKAGE, layer, "__init__.py")
        docstring = ast.get_docstring(ast.parse(open(init).read()))
        assert docstring and len(docstring) > 80, f"{init} needs a paragraph saying what the layer holds"
    assert sorted(name for name in os.listdir(PACKAGE) if os.path.isdir(os.path.join(PACKAGE, name))
                  and name != "__pycache__") == sorted(LAYERS[1:])


def test_the_checks_can_fail():
    graph = {"siglip_jax.models.vit": {"siglip_jax.training.trainer"},
             "siglip_jax.training.trainer": {"siglip_jax.models.vit"},
             "siglip_jax.data.a": {"siglip_jax.data.b"}, "siglip_jax.data.b": {"siglip_jax.data.a"}}
    assert _backward_imports(graph) == [
        "siglip_jax.models.vit (models) imports siglip_jax.training.trainer (training), a layer above it"]
    assert sorted(map(tuple, _cycles(graph))) == [
        ("siglip_jax.data.a", "siglip_jax.data.b", "siglip_jax.data.a"),
        ("siglip_jax.models.vit", "siglip_jax.training.trainer", "siglip_jax.models.vit")]


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from siglip_jax.data import images\n", "imports siglip_jax.data.images inside a function"),
])
def test_a_function_level_import_is_reported(tmp_path, source, expected):
    module_path = tmp_path / "late.py"
    module_path.write_text(source)
    modules = _modules()
    modules["siglip_jax.data.late"] = str(module_path)
    _, nested = _imports(modules)
    assert any(expected in line for line in nested), nested
