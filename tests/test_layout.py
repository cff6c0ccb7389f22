"""Which package may import which (README, "Repository layout"), checked on the source with ``ast``.

    cli.py, xmei.{predict, predictor, attention,      run stage 1 for a user: may import anything
      report, demo, serve, serve_page}, xmei (its lazy Predictor)
    pipeline/ (stage 1)  |  the rest of xmei/ (stage 2)  never import each other
    stores/                                            imports neither stage
    xmei.{errors, labels, config, prompt, interrupt}   shared leaves: import only each other

Every ``import`` counts, at the top of a module or inside a function, so no arrow hides in a
lazy import. An arrow goes within a group or down this table, never across the middle row.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"xmei.errors", "xmei.labels", "xmei.config", "xmei.prompt", "xmei.interrupt"}
# "xmei" is the package's __init__, which exports xmei.predictor's Predictor (on first use)
ORCHESTRATION = {"cli", "xmei", "xmei.predict", "xmei.predictor", "xmei.attention", "xmei.report", "xmei.demo",
                 "xmei.serve", "xmei.serve_page"}
# The project groups a group may import besides itself.
ALLOWED = {
    "orchestration": {"pipeline", "xmei", "stores", "leaves"},
    "pipeline": {"stores", "leaves"},
    "xmei": {"stores", "leaves"},
    "stores": {"leaves"},
    "leaves": set(),
}


def module_name(path: Path) -> str:
    """``xmei/config.py`` -> ``xmei.config``; ``stores/__init__.py`` -> ``stores``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = sorted([ROOT / "cli.py", *(p for d in ("pipeline", "stores", "xmei") for p in (ROOT / d).rglob("*.py"))])
MODULES = {module_name(p) for p in SOURCES}


def group(module: str) -> str | None:
    """The group of a dotted module name; None outside the project (a library)."""
    if module in LEAVES:
        return "leaves"
    if module in ORCHESTRATION:
        return "orchestration"
    top = module.split(".")[0]
    return top if top in ("pipeline", "stores", "xmei") else None


def imported(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``tree``, functions included; ``from p import m``
    names ``p.m`` when that is a module of the project, relative imports are resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
                      for alias in node.names]
    return found


def violations(source: str, module: str, path: str, is_package: bool = False) -> list[str]:
    """``path:line: module (group) imports target (group)`` for each import the rule forbids."""
    mine = group(module)
    found = []
    for line, target in imported(ast.parse(source, path), module, is_package):
        theirs = group(target)
        if theirs is not None and theirs != mine and theirs not in ALLOWED[mine]:
            found.append(f"{path}:{line}: {module} ({mine}) imports {target} ({theirs}); "
                         f"{mine} may import only {', '.join(sorted(ALLOWED[mine] | {mine}))}")
    return found


def test_the_tree_keeps_the_rule():
    found = [v for p in SOURCES
             for v in violations(p.read_text(), module_name(p), str(p.relative_to(ROOT)), p.name == "__init__.py")]
    assert not found, "imports against the layout rule (README, Repository layout):\n" + "\n".join(found)


def test_the_named_modules_exist():
    # a renamed leaf or orchestration module would otherwise drop out of the rule unnoticed
    assert LEAVES | ORCHESTRATION <= MODULES


@pytest.mark.parametrize("module, source, target", [
    ("pipeline.extract", "def run():\n    from xmei.model import XMEIQwen\n", "xmei.model (xmei)"),  # lazy counts
    ("pipeline.extract", "from xmei import model\n", "xmei.model (xmei)"),
    ("stores.store", "import pipeline.decode\n", "pipeline.decode (pipeline)"),
    ("xmei.train", "import os\nimport pipeline.decode as decode\n", "pipeline.decode (pipeline)"),
    ("xmei.evaluate", "from xmei.demo import run_demo\n", "xmei.demo (orchestration)"),  # stage 1 via the demo
    ("xmei.config", "from xmei.model import XMEIQwen\n", "xmei.model (xmei)"),  # a leaf stays a leaf
    ("xmei.labels", "from stores import FeatureStore\n", "stores (stores)"),
])
def test_a_broken_rule_names_file_line_and_module(module, source, target):
    line = source.count("\n")  # each source breaks the rule on its last line
    [found] = violations(source, module, "some/file.py")
    assert found.startswith(f"some/file.py:{line}: {module} ({group(module)}) imports {target};")


@pytest.mark.parametrize("module, source, is_package", [
    ("pipeline.tiny_models", "from xmei.config import MODEL_SUBDIRS\nfrom xmei.prompt import PLACEHOLDER_TOKENS\n", False),
    ("pipeline.extract", "import torch\nfrom stores import FeatureStore\nfrom pipeline.farm import check_farm\n", False),
    ("xmei.demo", "from pipeline.synth import synth_corpus\nfrom xmei.attention import draw_attention\n", False),
    ("stores", "from .store import FeatureStore\n", True),  # relative, within stores
    ("xmei.config", "from xmei.errors import UserError\nfrom .labels import LabelSet\n", False),
])
def test_allowed_imports_pass(module, source, is_package):
    assert violations(source, module, "f.py", is_package) == []


def test_relative_imports_are_resolved():
    found = violations("from ..pipeline import decode\n", "xmei.train", "xmei/train.py")
    assert found and "imports pipeline.decode (pipeline)" in found[0]
