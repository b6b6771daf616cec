"""Package layout: the library never imports the miniature, and the test oracle is not in the wheel."""

import ast
import importlib.util
from pathlib import Path

import mmr_mmcot

LIBRARY = Path(mmr_mmcot.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    package = ".".join(("mmr_mmcot", *path.relative_to(LIBRARY).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_library_modules_never_import_the_miniature():
    library = [p for p in LIBRARY.rglob("*.py") if "miniature" not in p.relative_to(LIBRARY).parts]
    assert len(library) >= 8  # data, features, inference, metrics, model, tokenizer, train, __init__
    offenders = {
        str(p.relative_to(LIBRARY)): sorted(n for n in _imports(p) if n.startswith("mmr_mmcot.miniature"))
        for p in library
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_a_relative_import_of_the_miniature(tmp_path, monkeypatch):
    bad = LIBRARY / "data.py"  # resolve against a real library path, read a fake text
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from .miniature.synthetic import corpus\n")
    assert "mmr_mmcot.miniature.synthetic" in _imports(bad)


def test_the_test_oracle_is_not_shipped():
    assert not (LIBRARY / "reference.py").exists()
    assert importlib.util.find_spec("mmr_mmcot.reference") is None
