"""docs/ARCHITECTURE.md's pictures are the code's imports: every arrow exists, and no import is missing from them."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

ARCHITECTURE = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
PACKAGES = ("models", "app", "cli", "training")


def project_imports(module: str) -> set[str]:
    """The project modules `module` (say "models.engine") imports, wherever in the file."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found - {module}


def code_block_after(heading: str) -> str:
    return ARCHITECTURE.split(heading, 1)[1].split("```", 2)[1]


def test_the_module_map_lists_every_module_with_exactly_its_imports() -> None:
    drawn: dict[str, set[str]] = {}
    for line in code_block_after("## The module map").strip().splitlines():
        module, _, targets = (part.strip() for part in line.partition("─▶"))
        package = module.split(".")[0]
        names = {name.strip() for name in targets.split(",") if name.strip()}
        drawn[module] = {name if "." in name else f"{package}.{name}" for name in names}
    modules = {
        f"{package}.{path.stem}"
        for package in ("models", "cli")
        for path in (ROOT / package).glob("*.py")
        if path.stem != "__init__"
    } - {"cli.__main__"}
    assert set(drawn) == modules, "the map and the modules differ: " + ", ".join(sorted(set(drawn) ^ modules))
    for module in sorted(modules):
        actual = project_imports(module) - {"models"}
        assert drawn[module] == actual, f"{module}: drawn {sorted(drawn[module])}, imports {sorted(actual)}"


def test_the_folder_picture_has_every_arrow_between_folders_and_no_other() -> None:
    drawn: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for line in code_block_after("# Architecture: one page").strip().splitlines():
        if "▶" not in line:
            continue
        source, _, targets = line.partition("─▶")
        folder = re.match(r"\s*(\w+)/", source)
        assert folder is not None, line
        drawn[folder.group(1)] = set(re.findall(r"(\w+)/", targets))
    actual: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            imported = project_imports(f"{package}.{path.stem}")
            actual[package] |= {name.split(".")[0] for name in imported} - {package}
    assert drawn == actual


def test_a_photo_goes_one_way_through_the_engine() -> None:
    """The engine's calls name their steps in order, and the photo path's picture names each stage's module."""
    picture = code_block_after("## One photo, one way")
    steps = [
        line.split()[0]
        for line in picture.splitlines()
        if line.strip().split()[:1] in (["prepare"], ["infer"], ["answer"])
    ]
    assert steps == ["prepare", "infer", "answer"]
    for module in ("models/decoding.py", "models/scheduling.py", "models/face_pipeline.py", "models/batching.py",
                   "models/predictor.py", "models/answers.py"):  # fmt: skip
        assert module in picture
    engine = (ROOT / "models" / "engine.py").read_text(encoding="utf-8")
    classify = engine.split("async def classify(", 1)[1].split("async def classify_batch(", 1)[0]
    assert classify.index("self._prepare(") < classify.index("self._infer(")
