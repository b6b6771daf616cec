"""The import graph inside each distribution: no import circle, and no library module importing a miniature.

Static analysis of every ``import`` / ``from ... import`` statement (function-level ones included: a circle
closed inside a function is still a circle) with :mod:`ast`, relative imports resolved against the
importing module's package. Imports under ``if TYPE_CHECKING:`` are left out: they never run.

A package's miniature reproduction lives in ``mmr_<pkg>/miniature/``; every other module of ``mmr_<pkg>``
is library code and must not import it, nor a miniature module left outside it (a module named
``reproduce``, ``synthetic`` or ``scenes``). The library must work for a user who never runs the miniature.
:mod:`tests.test_import_direction` checks the direction between distributions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("imagebind", "medvlm", "mmcot", "llava")
SOURCES = {"mmr_core": ROOT / "shared" / "src" / "mmr_core"} | {
    f"mmr_{name}": ROOT / "packages" / name / "src" / f"mmr_{name}" for name in PACKAGES
}
#: Names of the miniature's modules: where they are found outside ``miniature/``, they belong in it.
MINIATURE_MODULE_NAMES = frozenset({"miniature", "reproduce", "synthetic", "scenes"})
#: Packages whose library/miniature split has not landed: strict xfail, so the fix turns it into an error.
UNSPLIT: Mapping[str, str] = {}


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of an import package (``__init__`` names the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth (``if TYPE_CHECKING:`` bodies skipped)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _is_type_checking_block(node):
            children = [c for c in children if c not in node.body]
        stack.extend(children)


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules ``module`` (read from ``path``) imports, among ``known`` dotted names.

    ``from pkg import name`` imports the submodule ``pkg.name`` when there is one, else ``pkg`` itself.
    Relative imports resolve against the module's package (the module itself for an ``__init__``).

    Raises:
        ValueError: A relative import that climbs above the top-level package (names the file and line).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        if node.level:
            if node.level > len(package):
                raise ValueError(f"{path}:{node.lineno}: relative import climbs above the top-level package")
            base = package[: len(package) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            targets.add(submodule if submodule in known else source)
    return {t for t in targets if t in known}


def _with_parent_packages(module: str, targets: set[str], known: set[str]) -> set[str]:
    """Add the packages Python initialises to import each target: importing ``a.b.c`` runs ``a/__init__`` and
    ``a/b/__init__`` first, except the importing module's own packages (already initialised or under way)."""
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    out = set(targets)
    for target in targets:
        parts = target.split(".")
        out |= {p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in known and p not in own}
    return out


def import_graph(package_dirs: Iterable[Path]) -> dict[str, set[str]]:
    """Module -> the first-party modules whose code runs when it imports, over all modules of ``package_dirs``.

    An import of ``pkg.sub.mod`` counts as importing the packages ``pkg`` and ``pkg.sub`` too (their
    ``__init__`` runs first), unless the importer lives inside them: a circle through a package's
    ``__init__`` re-exports is still a circle.
    """
    files: dict[str, Path] = {}
    for package_dir in package_dirs:
        files |= module_files(package_dir)
    known = set(files)
    return {module: _with_parent_packages(module, imported_modules(module, path, known), known) - {module}
            for module, path in files.items()}


def import_circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(circles)


def is_miniature(module: str) -> bool:
    """Whether a dotted module name is miniature code: under ``<pkg>.miniature`` or named like its modules."""
    return any(part in MINIATURE_MODULE_NAMES for part in module.split(".")[1:])


def library_imports_of_miniature(graph: Mapping[str, set[str]]) -> list[str]:
    """``"library -> miniature"`` for every library module importing miniature code of its package."""
    return [
        f"{module} -> {target}"
        for module in sorted(graph)
        if not module.split(".")[1:2] == ["miniature"]
        for target in sorted(graph[module])
        if is_miniature(target)
    ]


def _cases() -> list:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=UNSPLIT[name])) if name in UNSPLIT else name
        for name in sorted(SOURCES)
    ]


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_no_import_circle(package: str) -> None:
    assert SOURCES[package].is_dir(), f"{SOURCES[package]} is missing"
    circles = import_circles(import_graph([SOURCES[package]]))
    assert not circles, f"import circles in {package}:\n" + "\n".join(" <-> ".join(c) for c in circles)


@pytest.mark.parametrize("package", _cases())
def test_library_never_imports_the_miniature(package: str) -> None:
    graph = import_graph([SOURCES[package]])
    assert graph, f"no modules found under {SOURCES[package]}"
    violations = library_imports_of_miniature(graph)
    # A miniature module outside miniature/ is misplaced even when nothing imports it yet.
    misplaced = sorted(m for m in graph if is_miniature(m) and m.split(".")[1] != "miniature")
    assert not violations and not misplaced, (
        f"{package}: library modules must not import the miniature, and miniature code belongs in "
        f"{package}/miniature/:\n" + "\n".join(violations + [f"misplaced: {m}" for m in misplaced])
    )


def _write_package(root: Path, files: Mapping[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


def test_checker_finds_circles_through_relative_and_function_level_imports(tmp_path: Path) -> None:
    pkg = _write_package(tmp_path, {
        "mmr_x/__init__.py": "from .model import Model\n",
        "mmr_x/config.py": "def load():\n    from . import yaml_io\n",  # closed inside a function
        "mmr_x/yaml_io.py": "from mmr_x.config import load\n",
        "mmr_x/model.py": "from .config import load\nfrom .sub import leaf\n",
        "mmr_x/sub/__init__.py": "",
        "mmr_x/sub/leaf.py": "from ..config import load\nfrom typing import TYPE_CHECKING\n"
                             "if TYPE_CHECKING:\n    from mmr_x.model import Model\n",
    })
    graph = import_graph([pkg])
    assert graph["mmr_x.model"] == {"mmr_x.config", "mmr_x.sub", "mmr_x.sub.leaf"}  # sub/__init__ runs too
    assert graph["mmr_x.sub.leaf"] == {"mmr_x.config"}  # the TYPE_CHECKING import never runs
    assert graph["mmr_x"] == {"mmr_x.model"}
    assert import_circles(graph) == [["mmr_x.config", "mmr_x.yaml_io"]]


def test_checker_finds_library_imports_of_the_miniature(tmp_path: Path) -> None:
    pkg = _write_package(tmp_path, {
        "mmr_x/__init__.py": "",
        "mmr_x/cli.py": "from mmr_x import miniature\n",
        "mmr_x/train.py": "from .miniature.synthetic import scenes\n",
        "mmr_x/data.py": "import mmr_x.scenes\n",
        "mmr_x/scenes.py": "",
        "mmr_x/miniature/__init__.py": "",
        "mmr_x/miniature/synthetic.py": "from mmr_x.data import load\n",
        "mmr_x/miniature/reproduce.py": "from .synthetic import scenes\nfrom mmr_x.train import fit\n",
    })
    graph = import_graph([pkg])
    assert library_imports_of_miniature(graph) == [
        "mmr_x.cli -> mmr_x.miniature", "mmr_x.data -> mmr_x.scenes", "mmr_x.train -> mmr_x.miniature",
        "mmr_x.train -> mmr_x.miniature.synthetic",
    ]
    assert import_circles(graph) == []


def test_checker_finds_circles_through_a_package_init(tmp_path: Path) -> None:
    """``a.records`` imports ``b.skips``, which runs ``b/__init__``, whose ``b.decoders`` imports ``a.images``,
    which runs ``a/__init__``, which imports ``a.records``: no module imports another module of the circle
    directly, yet importing ``a`` first or ``b`` first gives a partly initialised module."""
    pkg = _write_package(tmp_path, {
        "mmr_x/__init__.py": "",
        "mmr_x/a/__init__.py": "from mmr_x.a.records import read\n",
        "mmr_x/a/records.py": "from mmr_x.b.skips import Counter\n",
        "mmr_x/a/images.py": "",
        "mmr_x/b/__init__.py": "from .decoders import decode\n",
        "mmr_x/b/skips.py": "",
        "mmr_x/b/decoders.py": "def decode():\n    from mmr_x.a.images import to_rgb\n",
    })
    graph = import_graph([pkg])
    assert graph["mmr_x.a.records"] == {"mmr_x.b", "mmr_x.b.skips"}
    assert graph["mmr_x.b.decoders"] == {"mmr_x.a", "mmr_x.a.images"}  # not mmr_x: its own package
    assert import_circles(graph) == [["mmr_x.a", "mmr_x.a.records", "mmr_x.b", "mmr_x.b.decoders"]]
