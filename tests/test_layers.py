"""The layers point one way and the import graph has no cycle; one module reads GGUF headers.

`quant/` (GGUF format and numerics) ← `convert/` (checkpoints → GGUF) ← `smallfour/`
(planning, runtime, prompts, front ends). Every import counts, the lazy ones inside
functions too (they run sooner or later); only `if TYPE_CHECKING:` blocks are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = ("quant", "convert", "smallfour")  # bottom first: a package may import only those before it
GGUF_READER = "quant.gguf_io"


def modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the three packages."""
    found = {}
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the three packages that module `name` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    resolved = set()
    for target in targets:
        while target and target not in known:  # `import a.b.c` of a name inside a.b → a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_layers_import_downward_only():
    rank = {package: i for i, package in enumerate(LAYERS)}
    upward = [f"{source} imports {target}" for source, targets in sorted(graph().items()) for target in sorted(targets)
              if rank[target.split(".")[0]] > rank[source.split(".")[0]]]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    described = [" ↔ ".join(c) + "\n    " + "\n    ".join(f"{a} → {b}" for a in c for b in sorted(edges[a] & set(c)))
                 for c in found]
    assert not found, "import cycles:\n" + "\n".join(described)


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_gguf_io_reads_gguf_headers():
    """No gguf.GGUFReader and no magic check outside quant/gguf_io.py: one reader, one set of messages."""
    offenders = []
    for name, path in modules().items():
        if name == GGUF_READER:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and node.value == b"GGUF":
                offenders.append(f"{name}:{node.lineno}: the GGUF magic")
            elif (isinstance(node, ast.Name) and node.id == "GGUFReader") or (
                    isinstance(node, ast.Attribute) and node.attr == "GGUFReader") or (
                    isinstance(node, ast.alias) and node.name == "GGUFReader"):
                offenders.append(f"{name}:{getattr(node, 'lineno', '?')}: gguf.GGUFReader")
    assert not offenders, "read GGUF headers with quant.gguf_io.read_header:\n" + "\n".join(offenders)


def test_llama_cpp_loads_before_numpy():
    """Any smallfour module, and the console script, load llama.cpp's shared library before numpy is imported:
    the other order crashed every model load of a CUDA build on an H200 (smallfour/__init__.py says more)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "events = []\n"
        "sys.addaudithook(lambda event, args: events.append((event, str(args[0]))) "
        "if event in ('import', 'ctypes.dlopen') else None)\n"
        "import smallfour.gpucheck\n"
        "loaded = next(i for i, (e, name) in enumerate(events) if e == 'ctypes.dlopen' and 'libllama' in name)\n"
        "numpy = next(i for i, (e, name) in enumerate(events) if e == 'import' and name == 'numpy')\n"
        "print(loaded < numpy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "True", done.stdout + done.stderr
