"""The package's modules import one another without cycles (imports inside functions included,
since they only hide a cycle), and each imports on its own in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gif_kernels"


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, whether it is a package's __init__)} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_modules(name: str, path: Path, is_package: bool, known: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file. Packages' __init__ files are
    left out as targets: importing a.b.c runs a/__init__ first whoever asks, so that is no edge."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.update(f"{source}.{alias.name}" for alias in node.names)
            targets.add(source)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {target for target in targets if target in known and not known[target][1] and target != name}


def test_no_import_cycles():
    known = modules()
    graph = {name: imported_modules(name, path, is_package, known) for name, (path, is_package) in known.items()}
    cycles, state, stack = [], {}, []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, cycles


def test_every_module_imports_in_a_fresh_interpreter():
    names = [name for name in modules() if not name.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    # Deepest first: a module that only works when its package's other modules are already loaded fails.
    ordered = sorted(names, key=lambda name: (-name.count("."), name))
    result = subprocess.run([sys.executable, "-c", code, *ordered], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
