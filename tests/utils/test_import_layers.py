"""The import direction between openmoe's packages (function-level imports included): no import
runs back up the layers weight_kinds < planner < peft < training."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "openmoe"


def openmoe_imports(path: Path) -> set[str]:
    """The openmoe packages/modules (first component under openmoe) that `path` imports."""
    depth = len(path.relative_to(PKG).parts) - 1  # folders below openmoe/
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "openmoe" and len(parts) > 1:
                    out.add(parts[1])
                continue
            up = node.level - 1  # `from .x` stays in this folder, `from ..x` goes one up
            if up < depth:
                out.add(path.relative_to(PKG).parts[0])  # inside the same top-level package
            elif up == depth:  # relative to openmoe/
                out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("openmoe."))
    return out


def imports_of(package: str) -> dict[str, set[str]]:
    root = PKG / package
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    return {str(f.relative_to(PKG)): openmoe_imports(f) for f in files}


@pytest.mark.parametrize("package, never", [
    ("peft", {"training", "planner"}),
    ("planner", {"peft", "training"}),
    ("weight_kinds.py", {"peft", "planner", "training", "utils"}),
])
def test_no_import_runs_back_up(package, never):
    bad = {f: sorted(i & never) for f, i in imports_of(package).items() if i & never}
    assert not bad, bad


def test_the_parser_sees_relative_imports():
    assert "training" in imports_of("cli")["cli/train.py"] and "weight_kinds" in imports_of("peft")["peft/targets.py"]
