"""The layers point down: bond_data <- trainer <- flows (with the CLI), and no import cycles.

Read from the source with `ast` (every import, lazy ones inside functions included), so the
rule holds for code paths the other tests never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bond_data", "trainer", "flows")
MAY_IMPORT = {"bond_data": {"bond_data"}, "trainer": {"bond_data", "trainer"},
              "flows": {"bond_data", "trainer", "flows"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every project module a file imports (absolute names; `from pkg import mod` counts as pkg.mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_layers_point_down():
    wrong = [f"{mod} imports {dep}" for mod, deps in _graph().items() for dep in deps
             if dep.split(".")[0] not in MAY_IMPORT[mod.split(".")[0]]]
    assert wrong == []


def test_only_flows_imports_both_lower_layers():
    both = [mod for mod, deps in _graph().items()
            if {"bond_data", "trainer"} <= {d.split(".")[0] for d in deps} - {mod.split(".")[0]}]
    assert both and all(m.split(".")[0] == "flows" for m in both)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack + [node, dep]
            if dep not in state and (cycle := visit(dep, stack + [node])):
                return cycle
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, []))), None)


def test_no_import_cycles():
    assert find_cycle(_graph()) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_the_walker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from trainer.train import train\n    import flows.cli\n")
    assert _imports(f) == {"trainer.train", "trainer.train.train", "flows.cli"}
