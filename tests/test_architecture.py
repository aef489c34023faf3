"""The layout is the architecture: the device side never reaches the compile side or the packages a phone does not
carry, and no module of the package imports itself back through another."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_edge"
COMPILE_ONLY = {"torch", "transformers", "onnx", "peft", "optimum", "onnxscript", "onnx_ir", "gguf", "safetensors"}
# The device side: reads packages, runs them, profiles them. cli.py is the front of both and imports each lazily.
DEVICE = ("__init__.py", "errors.py", "config.py", "recipes.py", "st_io.py", "adapters", "package", "runtime", "profile", "native", "serve")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules(*roots: str) -> list[Path]:
    out = []
    for r in roots:
        p = PACKAGE / r
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            names.add(mod)
            names |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` may import a module
    return names


@pytest.mark.parametrize("path", _modules(*DEVICE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_device_modules_import_nothing_of_the_compile_side(path):
    """Anywhere in the module, lazy imports inside functions included."""
    bad = sorted(n for n in _imports(path, top_level_only=False)
                 if n.split(".")[0] in COMPILE_ONLY or n == "lora_edge.compile" or n.startswith("lora_edge.compile."))  # fmt: skip
    assert not bad, f"{path.relative_to(PACKAGE)} is device side and imports {bad}"


def test_device_side_runs_with_the_compile_packages_missing(tiny_package):
    """Load a package and generate in a process where torch, transformers, onnx and peft cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {sorted(COMPILE_ONLY)!r}: sys.modules[name] = None\n"
        "import lora_edge, lora_edge.profile, lora_edge.package.inspect, lora_edge.native.register, lora_edge.cli\n"
        f"m = lora_edge.load({str(tiny_package)!r})\n"
        "print(m.generate_ids([5, 6, 7], 'qv_r4', 3)[0])\n"
        "assert not any(k.startswith('lora_edge.compile') for k in sys.modules), sorted(sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_no_import_cycles():
    """Module-level imports between the package's modules form no cycle (imports inside functions are how the
    CLI and loaders pick a side lazily, and are not part of the module graph)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {n for n in _imports(p, top_level_only=True) if n in modules and n != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], m, n] if n in stack else [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])


def test_no_module_is_a_monolith():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 500}
