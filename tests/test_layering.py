"""The packages' layering, read statically from the source (nothing is imported).

- `moe/` and `mixtures/` import nothing from `anneal/` (anneal builds on them, never the reverse).
- Inside `anneal/`, rooms in a fixed order (`ROOMS`, lowest first): a module imports only from its
  own room or a lower one, with no exception allowed.
- No import cycle between the modules of anneal/, moe/ and mixtures/. Every `import x` and
  `from x import y` counts, relative ones and lazy ones inside functions included.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("anneal", "moe", "mixtures")
INDEPENDENT = ("moe", "mixtures")  # may not import anneal

# The rooms of anneal/, lowest first; a room is the modules under any of its names. The order is
# model < checkpoints < parallel < train < cli; the other top-level modules sit where what they
# import and what imports them puts them:
# - the base, below the model: the package itself, `errors`, `paths` and `config` (the config schema
#   and its checks, which import nothing of ours but errors);
# - with `train`: `evals` (its trainer callback is a `train.callbacks.Callback`, and the loop runs
#   it), `memory_plan` and `host_plan` (the planner reads the batch ramp; `train.build` refuses a
#   layout that does not fit with it);
# - with `cli`: `__main__`, and the command-line tools `compare`, `planning` and `checkpoint_cli`
#   (anneal-export, -catalog, -soup, -compare).
ROOMS = (
    ("anneal", "anneal.errors", "anneal.paths", "anneal.config"),
    ("anneal.model",),
    ("anneal.checkpoints",),
    ("anneal.parallel",),
    ("anneal.train", "anneal.evals", "anneal.memory_plan", "anneal.host_plan"),
    ("anneal.cli", "anneal.__main__", "anneal.compare", "anneal.planning", "anneal.checkpoint_cli"),
)

# Import edges (importer, imported) left out of the cycle check. Keep this empty; each entry is a
# known cycle waiting for its fix, and the test below fails once the cycle is gone, so that the
# entry gets removed.
KNOWN_CYCLE_EDGES: set = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file: top level, in functions, anywhere.
    `from a import b` gives `a.b`: the module `a.b`, or the name b of module `a` (see _resolve)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out += [(module if alias.name == "*" else f"{module}.{alias.name}", node.lineno)
                    for alias in node.names]
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that `target` names (the longest known prefix), or None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """-> ({importer: {imported module of ours: line}}, {importer: [(any imported name, line)]})."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    raw: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        raw[name] = _imports(name, path)
        for target, line in raw[name]:
            dep = _resolve(target, modules)
            if dep is not None and dep != name:
                graph[name].setdefault(dep, line)
    return graph, raw


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle path [a, b, ..., a] per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:  # a shortest way back to the component's first module (BFS)
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier, seen = [start], {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append(path + [start])
    return cycles


def _reaches(graph: dict[str, dict[str, int]], src: str, dst: str) -> bool:
    seen, todo = {src}, [src]
    while todo:
        for w in graph[todo.pop()]:
            if w == dst:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def _without(graph: dict[str, dict[str, int]], edges) -> dict[str, dict[str, int]]:
    return {a: {b: line for b, line in deps.items() if (a, b) not in edges} for a, deps in graph.items()}


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = _modules()
    steps = [f"{a} ({modules[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def imports_of_anneal(raw: dict[str, list[tuple[str, int]]]) -> list[str]:
    """'file:line: imports name' for each import of anneal in moe/ or mixtures/."""
    modules = _modules()
    return sorted({f"{modules[m].relative_to(ROOT)}:{line}: imports {target}"
                   for m, targets in raw.items() if m.split(".")[0] in INDEPENDENT
                   for target, line in targets if target == "anneal" or target.startswith("anneal.")})


def test_moe_and_mixtures_do_not_import_anneal():
    bad = imports_of_anneal(import_graph()[1])
    assert not bad, "moe/ and mixtures/ must not import anneal:\n" + "\n".join(bad)


def room_of(module: str) -> int | None:
    """The index in ROOMS of the room holding `module` (its longest matching name), None if none does."""
    best, best_len = None, -1
    for i, names in enumerate(ROOMS):
        for name in names:
            matches = module == name or (name != "anneal" and module.startswith(name + "."))
            if matches and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """'file:line: a (room) imports b (room)' for each import of anneal/ from a higher room."""
    modules = _modules()
    out = []
    for a, deps in graph.items():
        if not a.startswith("anneal"):
            continue
        for b, line in deps.items():
            if b.startswith("anneal") and room_of(b) > room_of(a):
                out.append(f"{modules[a].relative_to(ROOT)}:{line}: {a} ({ROOMS[room_of(a)][0]}) imports "
                           f"{b} ({ROOMS[room_of(b)][0]})")
    return sorted(out)


def test_every_anneal_module_has_a_room():
    homeless = [m for m in _modules() if m.startswith("anneal") and room_of(m) is None]
    assert not homeless, f"put these modules in a room of ROOMS: {homeless}"


def test_anneal_rooms_import_only_downward():
    bad = upward_imports(import_graph()[0])
    assert not bad, "imports from a higher room (ROOMS: model < checkpoints < parallel < train < cli):\n" + \
        "\n".join(bad)


def test_no_import_cycles():
    graph, _ = import_graph()
    cycles = find_cycles(_without(graph, KNOWN_CYCLE_EDGES))
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_known_cycles_still_exist():
    """Each allowlisted edge must still close a cycle; once it does not, delete its entry."""
    graph, _ = import_graph()
    for a, b in KNOWN_CYCLE_EDGES:
        assert b in graph[a] and _reaches(graph, b, a), \
            f"{a} -> {b} no longer closes an import cycle: remove it from KNOWN_CYCLE_EDGES"


def test_the_checker_sees_relative_lazy_and_cyclic_imports(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: a relative import inside a function closes a cycle."""
    pkg = tmp_path / "moe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import moe.c\nfrom anneal.errors import AnnealError\n")
    (pkg / "c.py").write_text("from moe import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("moe",))
    graph, raw = import_graph()
    assert graph["moe.a"] == {"moe.sub.b": 2} and graph["moe.c"] == {"moe.a": 1}
    assert imports_of_anneal(raw) == ["moe/sub/b.py:2: imports anneal.errors.AnnealError"]
    assert find_cycles(graph) == [["moe.a", "moe.sub.b", "moe.c", "moe.a"]]
    assert _describe(find_cycles(graph)[0], graph).startswith("moe.a (moe/a.py:2) -> moe.sub.b")


def test_the_room_checker_sees_an_upward_lazy_import(tmp_path, monkeypatch):
    """The room check itself, on a made-up anneal/: a lazy import of train from model is upward."""
    pkg = tmp_path / "anneal"
    for sub in ("model", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "m.py").write_text("def f():\n    from anneal.train import t\n")
    (pkg / "train" / "t.py").write_text("from anneal.model import m\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("anneal",))
    graph, _ = import_graph()
    assert room_of("anneal.model.m") < room_of("anneal.train.t")
    assert upward_imports(graph) == ["anneal/model/m.py:2: anneal.model.m (anneal.model) imports "
                                     "anneal.train.t (anneal.train)"]
