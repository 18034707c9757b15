"""The repository's layout rules, read from the source (ast and text), not from running it.

- Imports point one way, ``run.py -> engines -> problems -> mqvae``: ``mqvae`` imports neither ``problems``
  nor ``engines``, and ``problems`` does not import ``engines`` (at the top of a module or inside a function).
- The quantizers have one import path, ``mqvae.nn.quantizers`` (no ``mqvae.quantizer`` shim).
- No library code computes a path from the repository's own location (``__file__``); a sweep's ``config:``
  paths are read relative to the sweep file's folder, then to the working folder.
- No code compares a ``task`` with ``==`` / ``!=`` (the task is an object that knows its own behaviour).
- No hypergradient state is set on a level with ``setattr``.
- Nothing refers to a file outside the repository (a path above it, a design document other than docs/design.md),
  in the code, the README or docs/.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A package may import those of its own layer and the layers below it (higher number = closer to the user).
LAYERS = {"mqvae": 0, "problems": 1, "engines": 2, "run": 3}
PACKAGES = ("mqvae", "problems", "engines")


def source_files(with_entry_point: bool = True) -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return files + ([ROOT / "run.py"] if with_entry_point else [])


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it is (function bodies included):
    ``import a.b``, ``from a import b`` (as ``a`` and ``a.b``), relative imports resolved against the file's
    package, and ``importlib.import_module`` / ``__import__`` with a literal name."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def test_imports_point_one_way():
    """run.py -> engines -> problems -> mqvae: no module imports a package of a layer above its own."""
    wrong = []
    for path in source_files():
        own = module_name(path).split(".")[0]
        for line, target in imported_modules(path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS[top] > LAYERS[own]:
                wrong.append(f"{rel(path)}:{line} imports {target} ({own} may import only "
                             f"{', '.join(p for p, layer in LAYERS.items() if layer <= LAYERS[own] and p != 'run')})")
    assert not wrong, "\n".join(wrong)


def test_the_import_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The checker itself: function-level, relative and importlib imports are all read."""
    package = tmp_path / "mqvae" / "sub"
    package.mkdir(parents=True)
    path = package / "mod.py"
    path.write_text("import os\nfrom .. import config\nfrom ..x import y\n"
                    "def f():\n    from engines.experiment import build_engine\n"
                    "    import importlib\n    importlib.import_module('problems.levels')\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    targets = {target for _, target in imported_modules(path)}
    assert {"os", "mqvae", "mqvae.config", "mqvae.x", "mqvae.x.y", "engines.experiment", "problems.levels"} <= targets


def test_quantizers_have_one_import_path():
    assert not (ROOT / "mqvae" / "quantizer.py").exists(), "mqvae/quantizer.py repeats mqvae/quantizers/__init__.py"
    wrong = [f"{rel(path)}:{line} imports {target}"
             for path in source_files() + sorted((ROOT / "tests").glob("*.py"))
             for line, target in imported_modules(path)
             if target == "mqvae.quantizer" or target.startswith("mqvae.quantizer.")]
    assert not wrong, "import from mqvae.nn.quantizers:\n" + "\n".join(wrong)


def test_library_code_does_not_locate_the_repository():
    """Paths come from the user (a config file, the working folder, an argument), never from where the package
    happens to be installed: no ``__file__`` in mqvae/, problems/ or engines/."""
    wrong = [f"{rel(path)}:{node.lineno}" for path in source_files(with_entry_point=False)
             for node in ast.walk(parse(path)) if isinstance(node, ast.Name) and node.id == "__file__"]
    assert not wrong, "__file__ used in library code:\n" + "\n".join(wrong)


def test_a_sweeps_config_paths_are_read_from_its_folder_whatever_the_working_folder(tmp_path, monkeypatch):
    from mqvae.errors import UserError
    from mqvae.evaluation.comparison import load_sweep

    folder, elsewhere = tmp_path / "sweeps", tmp_path / "cwd"
    folder.mkdir()
    elsewhere.mkdir()
    shipped = (ROOT / "configs" / "digits" / "vqvae.yaml").read_text()
    (folder / "local.yaml").write_text(shipped)
    (elsewhere / "cwd_only.yaml").write_text(shipped)
    sweep_file = folder / "s.yaml"
    sweep_file.write_text("sweep:\n  runs:\n    - {label: a, config: local.yaml}\n"
                          f"    - {{label: c, config: {ROOT / 'configs/digits/mqvae.yaml'}}}\n")
    monkeypatch.chdir(elsewhere)
    runs = load_sweep(sweep_file).runs
    assert [Path(run.config) for run in runs] == [folder / "local.yaml", ROOT / "configs/digits/mqvae.yaml"]
    # A file in the working folder only is not found: the sweep means the same wherever it is run from.
    sweep_file.write_text("sweep:\n  runs:\n    - {label: a, config: cwd_only.yaml}\n")
    with pytest.raises(UserError, match=f"file 'cwd_only.yaml' not found in '{folder}'"):
        load_sweep(sweep_file)

    # Every shipped sweep names its configs from its own folder: found from any working folder.
    for shipped_sweep in sorted((ROOT / "configs" / "tables").glob("*.yaml")):
        assert all(Path(run.config).is_file() for run in load_sweep(shipped_sweep).runs), shipped_sweep


def _is_task(node: ast.expr) -> bool:
    """``task``, ``model.task``, ``cfg["task"]``, and anything read off one of them (``model.task.name``)."""
    while True:
        if isinstance(node, ast.Name):
            return node.id == "task"
        if isinstance(node, ast.Attribute):
            if node.attr == "task":
                return True
            node = node.value
        elif isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Constant) and node.slice.value == "task":
                return True
            node = node.value
        else:
            return False


def task_comparisons(tree: ast.AST) -> list[ast.Compare]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
            and any(_is_task(operand) for operand in [node.left, *node.comparators])]


def test_no_code_branches_on_a_task_name():
    wrong = [f"{rel(path)}:{node.lineno}: {ast.unparse(node)}" for path in source_files()
             for node in task_comparisons(parse(path))]
    assert not wrong, "task compared with == / !=:\n" + "\n".join(wrong)


# The names a level goes by where hypergradient code holds one (Betty calls the lower level ``curr``, the upper
# one ``prev``).
LEVEL_NAMES = re.compile(r"\b(level|levels|curr|prev|upper|lower|problem|lower_level|upper_level)\b")


def level_setattrs(tree: ast.AST, any_target: bool) -> list[ast.Call]:
    """``setattr(x, ...)`` / ``x.__setattr__(...)`` calls whose ``x`` is named as a level (every one with
    ``any_target``)."""
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "setattr" and node.args:
            target = node.args[0]
        elif isinstance(func, ast.Attribute) and func.attr == "__setattr__":
            # object.__setattr__(level, ...) names the target first; level.__setattr__(...) before the dot
            target = node.args[0] if isinstance(func.value, ast.Name) and func.value.id == "object" and node.args \
                else func.value
        else:
            continue
        if any_target or LEVEL_NAMES.search(ast.unparse(target)):
            calls.append(node)
    return calls


def test_no_hypergradient_state_is_set_on_a_level_with_setattr():
    """Anywhere, ``setattr`` on something named as a level; in mqvae/hypergradients.py, any ``setattr``."""
    wrong = [f"{rel(path)}:{node.lineno}: {ast.unparse(node)}" for path in source_files()
             for node in level_setattrs(parse(path), any_target=rel(path) == "mqvae/hypergradients.py")]
    assert not wrong, "state set on a level with setattr:\n" + "\n".join(wrong)


def test_the_code_checkers_see_what_they_look_for():
    """The checkers themselves, on code that breaks each rule and code that does not."""
    tree = ast.parse("if model.task == 'reconstruction': pass\nok = task != 2\nx = cfg['task'] == 'a'\n"
                     "y = self.model.task.name != 'b'\nz = model.kind == 'vqvae'\nw = 'task' in names\n")
    assert [ast.unparse(n) for n in task_comparisons(tree)] == [
        "model.task == 'reconstruction'", "task != 2", "cfg['task'] == 'a'", "self.model.task.name != 'b'"]
    tree = ast.parse("setattr(level, name, b)\nsetattr(curr, '_x', 1)\nprev.__setattr__('_y', 2)\n"
                     "object.__setattr__(upper, 'z', 3)\nsetattr(module, 'rho', p)\n")
    assert len(level_setattrs(tree, any_target=False)) == 4
    assert len(level_setattrs(tree, any_target=True)) == 5


# A path that climbs out of its folder (not the "..." of an elided path), an absolute path under /work, or a
# design document other than docs/design.md.
OUTSIDE = [
    (re.compile(r"(?<![\w.])\.\./"), "a path above its folder"),
    (re.compile(r"/work/"), "an absolute path"),
    (re.compile(r"(?<!docs/)\bdesign\.md\b", re.IGNORECASE), "a design document other than docs/design.md"),
]


def text_files() -> list[Path]:
    return source_files() + [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)")


def outside_references(path: Path, text: str) -> list[str]:
    """What ``text`` (the content of ``path``) refers to outside the repository. A markdown link is read
    relative to its file, as a renderer reads it, and may climb to a file of the repository (docs/ -> README)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        allowed = []  # the spans of links that stay inside the repository
        if path.suffix == ".md":
            for link in MARKDOWN_LINK.finditer(line):
                target = (path.parent / link.group(1)).resolve()
                if target == ROOT.resolve() or ROOT.resolve() in target.parents:
                    allowed.append(range(*link.span(1)))
        for pattern, label in OUTSIDE:
            if any(not any(match.start() in span for span in allowed) for match in pattern.finditer(line)):
                found.append(f"{rel(path)}:{number}: {label}: {line.strip()}")
    return found


@pytest.mark.parametrize("path", text_files(), ids=rel)
def test_nothing_refers_to_a_file_outside_the_repository(path):
    wrong = outside_references(path, path.read_text(encoding="utf-8"))
    assert not wrong, "\n".join(wrong)


def test_the_reference_checker_sees_what_it_looks_for():
    doc, code = ROOT / "docs" / "x.md", ROOT / "mqvae" / "x.py"
    assert outside_references(doc, "see the [README](../README.md) and `.../<dataset>/`") == []
    assert outside_references(ROOT / "docs" / "a" / "x.md", "[README](../../README.md)") == []
    assert outside_references(code, "# .../<dataset>/<label>, docs/design.md, Docs/Design.md") == []
    for text in ("# see ../elsewhere/papers", "# /work/elsewhere/notes.txt", "# the design notes, Design.md",
                 "[papers](../../elsewhere/papers/x.txt)"):
        assert outside_references(doc if text.startswith("[") else code, text), text


def test_the_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "design.md").is_file()
    assert "docs/design.md" in (ROOT / "README.md").read_text(encoding="utf-8")


# -- the package's parts (docs/design.md, "The map") --------------------------------------------------------------

# What a part of mqvae may import of mqvae besides itself (function-level imports included). nn holds pure torch
# modules that know no config; the registry is a leaf that every part registers into; the config's validation
# reads only the registry (a section with checks of its own registers a validator there).
MAY_IMPORT = {
    "mqvae.nn": ("mqvae.errors",),
    "mqvae.registry": ("mqvae.errors",),
    "mqvae.errors": (),
    "mqvae.config.schema": ("mqvae.errors", "mqvae.registry", "mqvae.config.plugins"),
    "mqvae.config.plugins": ("mqvae.errors",),
}


def module_files(root: Path) -> dict[str, Path]:
    files = [path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))]
    files += [root / "run.py"] if (root / "run.py").exists() else []
    return {module_name_in(root, path): path for path in files}


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the repository it imports, wherever the import is (function bodies included).
    ``from package import name`` imports ``package.name`` when that is a module, else ``package``."""
    modules = module_files(root)

    def resolved(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(resolved(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else resolved(source))
        edges[module] = {target for target in found if target and target != module}
    return edges


def import_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] (depth-first search for a back edge)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return []

    for module in sorted(edges):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def part_violations(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        for part, allowed in MAY_IMPORT.items():
            if module == part or module.startswith(part + "."):
                wrong += [f"{module} imports {target} ({part} may import {', '.join(allowed) or 'nothing of mqvae'})"
                          for target in sorted(targets) if target.startswith("mqvae") and not
                          any(target == ok or target.startswith(ok + ".") for ok in (part, *allowed))]
    return wrong


def test_no_import_cycle():
    cycle = import_cycle(import_edges(ROOT))
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_each_part_imports_only_what_it_may():
    wrong = part_violations(import_edges(ROOT))
    assert not wrong, "\n".join(wrong)


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_find_a_planted_cycle_and_a_planted_forbidden_import(tmp_path):
    # A cycle through a function-level import, and nn importing the config: both are found.
    planted = plant(tmp_path, {
        "mqvae/__init__.py": "", "mqvae/errors.py": "",
        "mqvae/config/__init__.py": "from mqvae.config.schema import spec\n",
        "mqvae/config/schema.py": "from mqvae.registry import DATASETS\ndef spec():\n    pass\n",
        "mqvae/registry.py": "def f():\n    from mqvae.data import loader\n",
        "mqvae/data/__init__.py": "", "mqvae/data/loader.py": "from mqvae import registry\n",
        "mqvae/nn/__init__.py": "", "mqvae/nn/net.py": "from mqvae.config import spec\n",
    })
    edges = import_edges(planted)
    assert import_cycle(edges) in (["mqvae.data.loader", "mqvae.registry", "mqvae.data.loader"],
                                   ["mqvae.registry", "mqvae.data.loader", "mqvae.registry"])
    wrong = part_violations(edges)
    assert any(line.startswith("mqvae.nn.net imports mqvae.config") for line in wrong), wrong
    assert any(line.startswith("mqvae.registry imports mqvae.data.loader") for line in wrong), wrong
    # ``from package import submodule`` is an edge to the submodule, not to the package: no cycle through
    # mqvae/config/__init__.py for a submodule that imports a sibling.
    (planted / "mqvae/registry.py").write_text("")
    (planted / "mqvae/config/plugins.py").write_text("")
    (planted / "mqvae/config/schema.py").write_text("from mqvae.config import plugins\n")
    assert import_cycle(import_edges(planted)) == []


@pytest.mark.parametrize("old, new, names", [
    ("mqvae.hypergradients", "mqvae.method.hypergradients", ["register_hypergradient", "mqvae", "HypergradientContext"]),
    ("mqvae.optim", "mqvae.method.optim", ["register_optimizer", "register_scheduler"]),
    ("mqvae.perf", "mqvae.runtime.perf", ["phase"]),
    ("mqvae.quantizers", "mqvae.nn.quantizers", ["VectorQuantizer", "GumbelQuantizer", "Quantizer"]),
])
def test_old_import_paths_still_work_for_one_release_and_say_where_the_names_are(old, new, names):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    current = importlib.import_module(new)
    assert all(getattr(module, name) is getattr(current, name) for name in names)
