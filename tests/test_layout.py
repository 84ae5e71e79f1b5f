"""Layout rules, checked on the source with `ast`: no import cycles inside fnscale, no function over 60 statements,
no class over 250 (fnscale/ and kernels/, which installs as fnscale.kernels)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"fnscale": REPO / "fnscale", "fnscale.kernels": REPO / "kernels"}
MAX_FUNCTION_STATEMENTS, MAX_CLASS_STATEMENTS = 60, 250


def source_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is named by its __init__.py)."""
    modules = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The fnscale modules that `name` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def statements(node: ast.AST) -> int:
    """Lines on which a statement starts: the size of a function or class whatever the formatter does to long calls."""
    return len({n.lineno for n in ast.walk(node) if isinstance(n, ast.stmt)})


def oversized() -> list[str]:
    """`file:line kind name (N statements)` for every function over 60 statements and class over 250."""
    out = []
    for path in source_modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            limit = MAX_CLASS_STATEMENTS if isinstance(node, ast.ClassDef) else MAX_FUNCTION_STATEMENTS
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                size = statements(node)
                if size > limit:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    out.append(f"{path.relative_to(REPO)}:{node.lineno} {kind} {node.name} ({size} statements)")
    return out


# ---------------------------------------------------------------- the checkers find what they should


def test_statement_count_ignores_how_a_call_is_wrapped():
    one_line = ast.parse("def f():\n    x = g(1, 2)\n    return x\n").body[0]
    wrapped = ast.parse("def f():\n    x = g(\n        1,\n        2,\n    )\n    return x\n").body[0]
    assert statements(one_line) == statements(wrapped) == 3  # the def, the assignment, the return


def test_cycle_finder_sees_direct_and_indirect_cycles():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}, "g": set()}
    assert cycles(graph) == [["a", "b"], ["c", "d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_resolves_absolute_relative_and_function_level_imports():
    graph = import_graph()
    assert "fnscale.eval.scoring" in graph["fnscale.recipes.train"]  # `from fnscale.eval.scoring import ...`
    assert "fnscale.data" in graph["fnscale.eval.scoring"]  # `from fnscale import data`
    assert {"fnscale.kernels", "fnscale.networks"} <= set(graph)


# ---------------------------------------------------------------- the rules


def test_no_import_cycles_inside_fnscale():
    assert cycles(import_graph()) == []


def layer(module: str) -> str:
    """cli, entry, recipes or core: the layers of the package (`python -m fnscale` is the CLI; the Python API
    `fnscale.api` and the trainer integrations are the entry layer beside it: `build_networks` runs the templates
    recipe; kernels and the other top-level modules are core)."""
    if module == "fnscale.__main__":
        return "cli"
    if module == "fnscale.api" or module == "fnscale.integrations" or module.startswith("fnscale.integrations."):
        return "entry"
    for top in ("cli", "recipes"):
        if module == f"fnscale.{top}" or module.startswith(f"fnscale.{top}."):
            return top
    return "core"


def test_imports_run_one_way_cli_recipes_core():
    """CLI (and the entry layer: Python API, integrations) -> recipes -> core: no core module (data, networks,
    masking, models, runtime, eval, ...) imports a recipe, the CLI or the entry layer, and no recipe imports either."""
    allowed = {
        "cli": {"cli", "recipes", "core"},
        "entry": {"entry", "recipes", "core"},
        "recipes": {"recipes", "core"},
        "core": {"core"},
    }
    wrong = [(m, d) for m, deps in import_graph().items() for d in deps if layer(d) not in allowed[layer(m)]]
    assert wrong == []


def test_layer_rule_sees_a_core_module_importing_a_recipe():
    assert layer("fnscale.masking.setup") == "core" and layer("fnscale.recipes.train") == "recipes"
    assert layer("fnscale.cli") == "cli" and layer("fnscale.kernels") == "core"
    assert layer("fnscale.api") == "entry" and layer("fnscale.integrations.trainer") == "entry"
    assert layer("fnscale") == "core"


def test_training_does_not_import_the_eval_recipe():
    """Training's loss and retention helpers live in fnscale.eval.scoring, not in the eval recipe."""
    graph = import_graph()
    assert "fnscale.recipes.evaluate" not in graph["fnscale.recipes.train"]


def test_no_function_over_60_statements_or_class_over_250():
    assert oversized() == []
