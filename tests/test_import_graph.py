"""Data flows one way through the package (docs/architecture.md): config -> data -> model -> loss ->
train_step -> trainer -> checkpoint/eval/export. Parsed from the source with ast, so it cannot regress."""
import ast
import os


PACKAGE = os.path.join(os.path.dirname(__file__), "..", "siglip_jax")

# Each module's layer, left to right. The consumers of a trained model (checkpoint, evaluation, export,
# loading, inference, search, serving) read parameters and the model, never the training machinery.
LAYERS = {
    "config": 0, "sharding": 0, "distributed": 0, "metrics": 0, "preemption": 0, "storage": 0, "cli": 0,
    "workdir": 0,
    "data": 1,
    "models": 2,
    "losses": 3, "losses_blockwise": 3,
    "optim": 4, "train_step": 4,
    "checkpoint": 5, "checkpoint_params": 5, "embedder": 5, "evaluation": 5, "export": 5, "loading": 5, "inference": 5,
    "search": 5, "serving": 5, "evaluation_cli": 5,
    "hooks": 6, "safeguards": 6, "trainer": 6,
}
CONSUMERS = 5


def _imports() -> dict[str, set[str]]:
    """{top-level siglip_jax module or package of each file: the siglip_jax modules it imports}."""
    graph: dict[str, set[str]] = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            relative = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
            module = relative.split("/")[0].removesuffix(".py")
            if module == "__init__":
                continue
            found = graph.setdefault(relative, {module})
            for node in ast.walk(ast.parse(open(path).read())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("siglip_jax"):
                    parts = node.module.split(".")
                    names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
                elif isinstance(node, ast.Import):
                    names = [alias.name.split(".")[1] for alias in node.names
                             if alias.name.startswith("siglip_jax.")]
                found.update(names)
    return graph


def _violations() -> list[str]:
    problems = []
    for relative, imported in sorted(_imports().items()):
        module = relative.split("/")[0].removesuffix(".py")
        if module not in LAYERS:
            problems.append(f"{relative}: module {module!r} has no layer in LAYERS; add it")
            continue
        for other in sorted(imported - {module}):
            if other not in LAYERS:
                problems.append(f"{relative} imports {other!r}, which has no layer in LAYERS")
            elif other == "trainer":
                problems.append(f"{relative} imports trainer: only the CLIs may")
            elif LAYERS[other] > LAYERS[module] and module not in ("trainer", "hooks"):
                problems.append(f"{relative} (layer {LAYERS[module]}) imports {other} (layer {LAYERS[other]}), to its right")
            elif LAYERS[module] == CONSUMERS and LAYERS[other] in (4, 6):
                problems.append(f"{relative} imports the training machinery {other!r}")
    return problems


def test_no_module_imports_one_to_its_right():
    assert _violations() == []


def test_the_check_sees_a_backward_import(monkeypatch):
    # An import that runs against the flow must be reported (the check can fail).
    monkeypatch.setitem(LAYERS, "models", 7)
    assert "checkpoint_params.py (layer 5) imports models (layer 7), to its right" in _violations()
