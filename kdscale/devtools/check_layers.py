"""Check that kdscale's imports only point down its layers and form no cycle.

    python -m kdscale.devtools.check_layers            # checks the kdscale/ beside this file
    python -m kdscale.devtools.check_layers --root DIR # checks DIR/kdscale (tests use a tmp tree)

Every import statement counts, including the ones inside functions: a function-local import is
still a dependency (it runs the first time the function does), and hiding an upward import in a
function is exactly what this check exists to catch. Exit status 0 when clean, 1 with one line
per problem (``file:line: ...``) otherwise. Standard library only: it runs before anything is
installed. The layering and its picture are in docs/design.md.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

# The layers, lowest first. A module may import modules of its own layer and of the layers below;
# never one above. A module belongs to the row whose pattern (fnmatch on dotted names) matches its
# own name or else its nearest parent package ("kdscale" names the root module only). A module
# that no row matches is itself an error, so a new package has to be placed here on purpose.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # standard library (+ yaml) only: the package root, atomic writes, config loading machinery
    ("base", ("kdscale", "kdscale.compat", "kdscale.io", "kdscale.config")),
    # shared pieces that know no stage: metrics, progress bars, run locks
    ("util", ("kdscale.metrics", "kdscale.progress", "kdscale.runlock")),
    ("data", ("kdscale.data",)),  # records, sources, shard + soft-label formats, loader
    ("models", ("kdscale.models",)),
    ("engine", ("kdscale.engine",)),  # trainer, checkpoints, rng, distributed
    ("distill", ("kdscale.distill",)),  # losses, teachers, teacher pass, tasks, student training
    ("eval", ("kdscale.eval",)),
    # the config schema assembles every stage's config section; the pipeline runs the stages
    ("assembly", ("kdscale.schema", "kdscale.pipeline")),
    ("experiments", ("kdscale.experiments",)),
    ("entry", ("kdscale.cli", "kdscale.__main__", "kdscale.devtools")),
]

PACKAGE = "kdscale"


@dataclass(frozen=True)
class Edge:
    """One import statement's dependency of module ``src`` on module ``dst``."""
    src: str
    dst: str
    path: Path
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """Index into LAYERS of ``module`` (its own name or the nearest parent that a row names)."""
    names = module.split(".")
    # the root package's row names the root module only, not everything under it
    for end in range(len(names), 1 if len(names) > 1 else 0, -1):
        candidate = ".".join(names[:end])
        for index, (_, patterns) in enumerate(LAYERS):
            if any(fnmatch.fnmatchcase(candidate, pattern) for pattern in patterns):
                return index
    return None


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path, modules: set[str]) -> list[Edge]:
    """Every kdscale module that ``path`` imports, anywhere in the file, with the line."""
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            # ``from pkg import sub`` depends on the submodule when ``sub`` is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            # ``import kdscale.data.shards.x`` where x is not a module: the deepest real module
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                edges.append(Edge(module, target, path, node.lineno))
    return sorted(set(edges), key=lambda e: (e.line, e.dst))  # one per statement and target


def collect(root: Path) -> tuple[dict[str, Path], list[Edge]]:
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(path, root): path for path in files}
    edges = [edge for path in files for edge in imports_of(path, root, set(modules))]
    return modules, edges


def _cycles(modules: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {m: [] for m in modules}
    for edge in edges:
        graph.setdefault(edge.src, []).append(edge.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(set(graph[start]))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(set(graph.get(child, []))))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def check(root: Path) -> list[str]:
    """One message per problem under ``root/kdscale``; empty when the layering holds."""
    modules, edges = collect(root)
    problems = []

    def where(path: Path, line: int) -> str:
        return f"{path.relative_to(root)}:{line}"

    for module, path in sorted(modules.items()):
        if layer_of(module) is None:
            problems.append(f"{where(path, 1)}: module {module} is in no layer "
                            f"(add it to LAYERS in kdscale/devtools/check_layers.py)")
    for edge in edges:
        src, dst = layer_of(edge.src), layer_of(edge.dst)
        if src is not None and dst is not None and dst > src:
            problems.append(
                f"{where(edge.path, edge.line)}: upward import: {edge.src} "
                f"(layer {LAYERS[src][0]}) imports {edge.dst} (layer {LAYERS[dst][0]})")
    for component in _cycles(sorted(modules), edges):
        members = set(component)
        inside = sorted((e for e in edges if e.src in members and e.dst in members),
                        key=lambda e: (str(e.path), e.line))
        detail = "; ".join(f"{where(e.path, e.line)} {e.src} -> {e.dst}" for e in inside)
        problems.append(f"{where(modules[component[0]], 1)}: import cycle between "
                        f"{', '.join(component)}: {detail}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the directory that holds the kdscale package (default: this one's)")
    args = parser.parse_args(argv)
    if not (args.root / PACKAGE).is_dir():
        print(f"check_layers: no {PACKAGE}/ package under {args.root}", file=sys.stderr)
        return 2
    problems = check(args.root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_layers: {len(problems)} problem(s); the layers are in "
              f"kdscale/devtools/check_layers.py and docs/design.md", file=sys.stderr)
        return 1
    print(f"check_layers: imports point down {len(LAYERS)} layers, no cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
