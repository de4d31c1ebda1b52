"""The shape of the code: layers without import cycles, short modules, facts instead of references to files
that are not in the repository, a generated flag reference that is current, help for every flag."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phi3v.args import RecipeArguments, load_script
from phi3v.flag_reference import CLI_ARGUMENTS
from tests.conftest import REPO

PACKAGE = REPO / "phi3v"
MAX_LINES = 400


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere: at the top, under TYPE_CHECKING, in functions."""
    root = package.parent
    paths = {module_name(path, root): path for path in package.rglob("*.py")}
    graph = {}
    for here, path in paths.items():
        parent = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in paths}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(parent[: len(parent) - node.level + 1] + ([node.module] if node.module else []))
                found |= {name for name in [base, *(f"{base}.{a.name}" for a in node.names)] if name in paths}
        graph[here] = found - {here}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, with the path it takes."""
    found = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph[node]:
                if target == start:
                    found.append(path + [start])
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    return found


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n")
    (package / "c.py").write_text("from .a import thing\n")
    assert ["pkg.a", "pkg.b", "pkg.a"] in cycles(import_graph(package))
    assert not any(cycle[0] == "pkg.c" for cycle in cycles(import_graph(package)))


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_models_never_import_data_or_training_and_data_never_imports_training():
    graph = import_graph(PACKAGE)
    upward = [
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if (module.startswith("phi3v.models") and target.startswith(("phi3v.data", "phi3v.training")))
        or (module.startswith("phi3v.data") and target.startswith("phi3v.training"))
    ]
    assert upward == []
    assert "phi3v.models.modeling" in graph and "phi3v.data.samples" in graph  # the walk sees the layers


def test_no_module_is_longer_than_400_lines():
    lengths = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > MAX_LINES} == {}


def test_code_and_docs_cite_no_file_outside_the_repository():
    pattern = re.compile(r"spec §|recipe_spec")
    places = [*PACKAGE.rglob("*.py"), *REPO.glob("*.py"), *(REPO / "benchmarks").rglob("*"), REPO / "README.md",
              *(REPO / "docs").rglob("*.md")]  # fmt: skip
    cited = [str(p.relative_to(REPO)) for p in places if p.is_file() and pattern.search(p.read_text(errors="replace"))]
    assert cited == []
    reads_shared = [str(p.relative_to(REPO)) for p in [*PACKAGE.rglob("*.py"), *REPO.glob("*.py")]
                    if "shared" in p.read_text() and re.search(r"\.\./shared|\"shared\"", p.read_text())]  # fmt: skip
    assert reads_shared == []


def test_the_readme_is_a_front_page_over_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", readme))
    assert linked == {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")}


def test_docs_flags_md_is_what_the_code_generates():
    generated = subprocess.run(
        [sys.executable, "-m", "phi3v.flag_reference"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert generated.returncode == 0, generated.stderr
    assert (REPO / "docs" / "flags.md").read_text() == generated.stdout, (
        "docs/flags.md is out of date: python -m phi3v.flag_reference > docs/flags.md"
    )


def flag_classes() -> list[type]:
    scripts = [load_script(str(path)).TASK.arguments for path in sorted(REPO.glob("finetune_hf_trainer_*.py"))]
    return [
        RecipeArguments,
        *scripts,
        *CLI_ARGUMENTS.values(),
        load_script(str(REPO / "convert_ucf101.py")).ConvertArguments,
    ]


@pytest.mark.parametrize("arguments", flag_classes(), ids=lambda cls: cls.__name__)
def test_every_flag_has_help(arguments):
    missing = [f.name for f in dataclasses.fields(arguments) if len(f.metadata.get("help", "").strip()) < 10]
    assert missing == []
