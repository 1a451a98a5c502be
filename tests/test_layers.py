"""The layers of DESIGN.md, enforced: every import inside ``ringflash/`` points down (or sideways),
and only ``ringflash.backends`` reaches into ``ringflash.kernels``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ringflash"

# Bottom to top. A module may import modules of its own layer or of layers below it.
LAYERS = [
    ("ringflash.kernels",),
    ("ringflash.device_errors",),  # below checks, which queues its value checks there
    (
        "ringflash.masking",
        "ringflash.merge",
        "ringflash.reference",
        "ringflash.checks",
        "ringflash.kv_checks",
        "ringflash.paged",
        "ringflash.rotary",
    ),
    ("ringflash.blockwise", "ringflash.blockwise_cache", "ringflash.blockwise_fused", "ringflash.cudnn"),
    ("ringflash.backends",),
    ("ringflash.ops", "ringflash.decode", "ringflash.forms"),
    ("ringflash.comm",),
    ("ringflash.parallel",),
    ("ringflash.integrations",),
    ("ringflash.demo", "ringflash.cli"),
    ("ringflash",),  # the package's __init__: the public names
]
# Only the dispatch layer (and the kernels themselves) may import the kernels.
KERNEL_USERS = ("ringflash.backends", "ringflash.kernels")


def _layer(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of DESIGN.md: add it to tests/test_layers.py"
    return level


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str):
    """Every ringflash module ``path`` imports (at module level or inside functions)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ringflash"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ringflash"):
                continue
            for alias in node.names:  # `from . import kernels` imports the submodule
                sub = ROOT.parent / f"{target}.{alias.name}".replace(".", "/")
                is_module = sub.is_dir() or sub.with_suffix(".py").exists()
                yield (f"{target}.{alias.name}" if is_module else target), node.lineno


FILES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_follow_the_layers(path):
    module = _module_name(path)
    mine = _layer(module)
    for target, line in _imports(path, module):
        where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        assert _layer(target) <= mine, f"{where}, a layer above {module} (DESIGN.md's layers)"
        if target.startswith("ringflash.kernels"):
            assert module.startswith(KERNEL_USERS), f"{where}: only ringflash.backends may import the kernels"


def test_the_walk_sees_every_layer():
    """The check above is not vacuous: the package's files and imports are found."""
    modules = {_module_name(p) for p in FILES}
    assert {"ringflash.backends", "ringflash.parallel.ring_attn", "ringflash.ops"} <= modules
    ring_imports = {
        t for t, _ in _imports(ROOT / "parallel" / "ring_attn.py", "ringflash.parallel.ring_attn")
    }
    assert "ringflash.backends" in ring_imports and "ringflash.comm.agree" in ring_imports
