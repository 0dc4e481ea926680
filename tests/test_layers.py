"""STYLE.md's import table, checked by parsing every module's imports."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffusion"
FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics"}
MATH = ["schedules", "gaussian", "losses", "sampling", "likelihood", "errors"]


def imported_roots(path: Path) -> set[str]:
    """Top-level names a module imports (absolute imports only: the package uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name} uses a relative import"
            names.add(node.module)
    return names


def roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("module", MATH)
def test_math_imports_no_framework(module):
    assert not roots(imported_roots(SRC / f"{module}.py")) & FRAMEWORKS


def test_nn_knows_nothing_of_schedules():
    for path in (SRC / "nn").glob("*.py"):
        names = imported_roots(path)
        assert not roots(names) & FRAMEWORKS, path.name
        ours = {n for n in names if n.startswith("diffusion.")}
        assert ours <= {"diffusion.errors"} | {n for n in ours if n.startswith("diffusion.nn")}, path.name
        text = path.read_text().lower()
        assert "beta" not in text and "alphas_cumprod" not in text, path.name


@pytest.mark.parametrize("module", ["module", "data"])
def test_glue_takes_plain_objects(module):
    path = SRC / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{module}.py not written yet")
    assert not roots(imported_roots(path)) & {"hydra", "omegaconf"}


def test_only_entry_points_import_run():
    for path in SRC.rglob("*.py"):
        if path.parent.name != "run":
            assert not any(n.startswith("diffusion.run") for n in imported_roots(path)), path
