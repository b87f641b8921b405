"""No module of the package imports more than MAX_IMPORTS others of it (issue 18): a module that needs
more has more than one job. Counts every ``from mlpfuse.x import`` / ``import mlpfuse.x`` (and the relative forms), at module
level or inside functions, as the distinct package modules it names."""

from __future__ import annotations

import ast
from pathlib import Path

import mlpfuse

MAX_IMPORTS = 12
PACKAGE = Path(mlpfuse.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, root: Path) -> str:
    """``name`` if it is a module of the package, else the package or module that holds it (an attribute)."""
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    if (root / relative).with_suffix(".py").is_file() or (root / relative / "__init__.py").is_file():
        return name
    return name.rpartition(".")[0]


def package_imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """The modules of the package at ``root`` that the module at ``path`` imports (absolute or relative)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    name = root.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(_resolve(a.name, root) for a in node.names if a.name.split(".")[0] == name)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not node.module or node.module.split(".")[0] != name:
                continue
            base = []
        else:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = base + node.module.split(".") if node.module else base
        found.update(_resolve(".".join(target + [alias.name]), root) for alias in node.names)
    found.discard(module)
    return found


def test_no_module_imports_more_than_twelve_others_of_the_package():
    counts = {_module_name(path, PACKAGE): package_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}
    assert len(counts) > 30 and max(len(v) for v in counts.values()) > 5  # the walk saw the package
    over = {name: sorted(imports) for name, imports in counts.items() if len(imports) > MAX_IMPORTS}
    assert not over, f"modules importing more than {MAX_IMPORTS} others of mlpfuse: {over}"


def test_the_count_sees_imports_of_every_form(tmp_path):
    """A module, a package, an attribute of a module and a function-level import each count once."""
    fake = tmp_path / "mlpfuse"
    (fake / "arch").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "arch/__init__.py", "arch/io.py"):
        (fake / name).write_text("")
    (fake / "user.py").write_text("from . import __version__, a\nfrom .b import x, y\nfrom .arch import lookup\n"
                                  "from .arch.io import z\ndef f():\n    from .a import w\n")
    (fake / "arch" / "deep.py").write_text("from ..b import x\nfrom .io import y\n")
    assert package_imports(fake / "user.py", fake) == {"mlpfuse", "mlpfuse.a", "mlpfuse.b", "mlpfuse.arch", "mlpfuse.arch.io"}
    assert package_imports(fake / "arch" / "deep.py", fake) == {"mlpfuse.b", "mlpfuse.arch.io"}
    (fake / "absolute.py").write_text("import torch\nfrom mlpfuse import __version__, a\nfrom mlpfuse.b import x\n"
                                      "import mlpfuse.arch.io\ndef f():\n    from mlpfuse.arch import lookup\n")
    assert package_imports(fake / "absolute.py", fake) == {"mlpfuse", "mlpfuse.a", "mlpfuse.b", "mlpfuse.arch",
                                                           "mlpfuse.arch.io"}
