"""The house rules, checked on the source: sub-packages in the data's order with no import
running back up, no import circle, modules and classes of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "lorabench"
# lowest first: a module may import from its own sub-package or from one listed before it
# optimizers sit below spec: a Cell validates its optimizer against their registry (they import no spec)
LAYERS = ["base", "optimizers", "spec", "sim", "adapters", "stacks", "estimator", "row", "train", "measure", "launch",
          "present", "cli"]
MAX_MODULE_LINES, MAX_CLASS_LINES = 420, 160


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """The lorabench modules `name` imports, at module level or inside functions."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + (node.module.split(".") if node.module else []))
            if mod.split(".")[0] != "lorabench":
                continue
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "lorabench")
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t in imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


def test_no_import_runs_back_up():
    bad = []
    for src, targets in graph().items():
        if layer(src) is None:
            continue  # lorabench/__init__.py (the lazy API) and __main__.py sit above every layer
        for t in targets:
            if layer(t) is None or LAYERS.index(layer(t)) > LAYERS.index(layer(src)):
                bad.append(f"{src} -> {t}")
    assert not bad, "imports that run back up:\n" + "\n".join(sorted(bad))


def test_no_import_circle():
    g = graph()
    # a package's __init__ importing its own modules is how Python packages work, not a circle
    g = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")} for m, ts in g.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    assert not circles, circles


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_and_class_sizes(name):
    path = modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name}: {size} lines"


def test_the_checker_sees_a_violation(tmp_path):
    """imports() resolves relative imports, so the rule above can fail."""
    p = tmp_path / "worker.py"
    p.write_text("from ..present.report import x\nfrom . import y\nimport lorabench.cli\n")
    assert imports("lorabench.measure.worker", p) == {"lorabench.present.report", "lorabench.present.report.x",
                                                       "lorabench.measure", "lorabench.measure.y", "lorabench.cli"}
