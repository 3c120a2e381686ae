"""Print wasi_tool's module import graph (module-level and deferred imports) and check the
layering rules: no stage imports another stage, models/ imports nothing from methods/, artifact/
imports nothing above the ground floor, no cycle.

    python scripts/import_graph.py            # the rules, and the cycles if any
    python scripts/import_graph.py --edges    # every edge, package to package
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "wasi_tool"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports(path: Path, name: str) -> set[str]:
    """wasi_tool modules that ``path`` imports, at any depth (deferred imports count)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("wasi_tool")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if not mod.startswith("wasi_tool"):
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            # "from wasi_tool import artifact" imports the module artifact, not the package's
            # __init__ names; only names that are not modules make it an import of ``mod``
            found |= set(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports(p, name) if m in modules} for name, p in modules.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


# What artifact/ (a ground-floor package) may import: itself and these modules.
GROUND_FLOOR = (
    "wasi_tool.errors",
    "wasi_tool.safe_read",
    "wasi_tool._version",
    "wasi_tool.measure",
)


def package_of(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2])


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in sorted(g.items()):
        for dst in sorted(dsts):
            if (
                src.startswith("wasi_tool.stages.")
                and dst.startswith("wasi_tool.stages.")
                and package_of(src) == package_of(dst)
                and src != dst
                and src != "wasi_tool.stages"
                and dst != "wasi_tool.stages.common"  # shared artifact writing, not a stage
            ):
                bad.append(f"stage imports stage: {src} -> {dst}")
            if src.startswith("wasi_tool.models") and dst.startswith("wasi_tool.methods"):
                bad.append(f"models imports methods: {src} -> {dst}")
            if (
                package_of(src) == "wasi_tool.artifact"
                and package_of(dst) != "wasi_tool.artifact"
                and dst not in GROUND_FLOOR
            ):
                bad.append(f"artifact imports a higher floor: {src} -> {dst}")
    bad += [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    return bad


def main() -> int:
    g = graph()
    if "--edges" in sys.argv:
        pkg: dict[str, set[str]] = {}
        for src, dsts in g.items():
            for dst in dsts:
                if package_of(src) != package_of(dst):
                    pkg.setdefault(package_of(src), set()).add(package_of(dst))
        for src in sorted(pkg):
            print(f"{src} -> {', '.join(sorted(pkg[src]))}")
    bad = violations(g)
    for line in bad:
        print(line)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges, {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
