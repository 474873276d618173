"""Imports follow the layer table of docs/architecture.md, and the core never imports
the demo package.

The table is read from the document itself, so the document cannot drift from the
code: a new folder that no row names fails here until the table names it. The graph
is read from the source with `ast` (imports inside functions count), nothing imported.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = "pebr_lightning"
DEMO = "pebr_demo"


def layer_table(doc: Path) -> list[list[str]]:
    """The rows of the code block under "## Layers", top row first: each row's names."""
    text = doc.read_text(encoding="utf-8")
    section = text[text.index("## Layers") :]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, f"{doc}: no code block under '## Layers'"
    rows = []
    for line in block.group(1).splitlines():
        names = re.split(r"\s{2,}", line.strip())[0]
        rows.append([name.strip() for name in names.split(",") if name.strip()])
    return rows


def unit(path: Path) -> str:
    """The table's name for a module file (relative to the repository root): the demo
    package, a folder (`models/`), a commands module (`*/commands.py`) or a top-level
    file (`cli.py`, `__init__.py`)."""
    parts = path.parts
    if parts[0] == DEMO:
        return DEMO
    if len(parts) == 2:
        return parts[1]
    if parts[-1] == "commands.py":
        return "*/commands.py"
    return f"{parts[1]}/"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under `root`."""
    found = {}
    for package in (CORE, DEMO):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path) -> set[str]:
    """The pebr_lightning / pebr_demo modules a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.split(".")[0] in (CORE, DEMO)}


def violations(root: Path, rows: list[list[str]]) -> list[str]:
    """Every import against the table, and every unit the table does not name."""
    rank = {name: i for i, row in enumerate(rows) for name in row}
    known = modules(root)
    problems = []
    for path in sorted(known.values()):
        source = unit(path.relative_to(root))
        if source not in rank:
            problems.append(f"{path.relative_to(root)}: {source} is in no row of the table")
            continue
        targets = set()
        for target in imported(path):  # `from a.b import c`: module a.b.c or name c of a.b
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known:
                targets.add(target)
        for target in sorted(targets):
            dest = unit(known[target].relative_to(root))
            if dest in rank and rank[dest] < rank[source]:
                problems.append(
                    f"{path.relative_to(root)} imports {target}: {source} may not import "
                    f"{dest}, a row above it"
                )
    return problems


def test_the_table_is_read_as_written():
    rows = layer_table(ROOT / "docs" / "architecture.md")
    assert rows[0] == [DEMO]
    assert "models/" in rows[-2] and "errors.py" in rows[-1]
    assert unit(Path("pebr_lightning/models/policy.py")) == "models/"
    assert unit(Path("pebr_lightning/models/__init__.py")) == "models/"
    assert unit(Path("pebr_lightning/rewards/commands.py")) == "*/commands.py"
    assert unit(Path("pebr_lightning/cli.py")) == "cli.py"
    assert unit(Path("pebr_lightning/__init__.py")) == "__init__.py"
    assert unit(Path("pebr_demo/models/tiny.py")) == DEMO


def test_imports_follow_the_layer_table():
    rows = layer_table(ROOT / "docs" / "architecture.md")
    assert modules(ROOT)["pebr_lightning.models.policy"]  # it read something
    assert violations(ROOT, rows) == []


def test_a_core_module_importing_the_demo_fails(tmp_path):
    """The check itself: a copy of the tree where the real loader imports the demo's toy
    model (as it did before the demo became a package) is refused, naming the file."""
    for package in (CORE, DEMO):
        shutil.copytree(ROOT / package, tmp_path / package)
    policy = tmp_path / CORE / "models" / "policy.py"
    policy.write_text(
        "from pebr_demo.models.tiny import ensure_tiny_model\n" + policy.read_text(),
        encoding="utf-8",
    )
    rows = layer_table(ROOT / "docs" / "architecture.md")
    assert violations(tmp_path, rows) == [
        "pebr_lightning/models/policy.py imports pebr_demo.models.tiny: models/ may not "
        "import pebr_demo, a row above it"
    ]


def test_a_lower_row_importing_a_higher_one_fails(tmp_path):
    for package in (CORE, DEMO):
        shutil.copytree(ROOT / package, tmp_path / package)
    math = tmp_path / CORE / "algorithms" / "losses.py"
    math.write_text(math.read_text() + "\ndef _late():\n    import pebr_lightning.modules.grpo\n")
    found = violations(tmp_path, layer_table(ROOT / "docs" / "architecture.md"))
    assert found == [
        "pebr_lightning/algorithms/losses.py imports pebr_lightning.modules.grpo: algorithms/ "
        "may not import modules/, a row above it"
    ]


def test_a_folder_no_row_names_fails(tmp_path):
    for package in (CORE, DEMO):
        shutil.copytree(ROOT / package, tmp_path / package)
    (tmp_path / CORE / "newthing").mkdir()
    (tmp_path / CORE / "newthing" / "__init__.py").write_text("")
    found = violations(tmp_path, layer_table(ROOT / "docs" / "architecture.md"))
    assert found == ["pebr_lightning/newthing/__init__.py: newthing/ is in no row of the table"]
