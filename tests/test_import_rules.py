"""Who may import whom, for every package: the rules below, checked by parsing every module's imports.

    math        schedules, gaussian, losses, likelihood, sampling/, images, paper_figures, posthoc_ema, nn/, errors:
                torch (and torchvision, matplotlib), never a framework or a higher layer
    nn/         torch only; nothing about schedules
    glue        module, data/, callbacks/, metrics/, evaluation, checkpointing, distributed: Lightning and
                torchmetrics, but plain Python objects in, so never hydra or omegaconf
    metrics/    no Lightning either: scores usable outside a Trainer
    diffusers_* reading and writing diffusers folders: torch and safetensors, never diffusers itself (a dev
                dependency) nor a framework
    callbacks/  imported by nothing but run/ (and tests): what two callers need lives a layer down
    run/        imported by nothing but the entry points (and tests); cli's guarded() writes the job's
                status.json through run.job_status alone
"""

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffusion"
FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics"}
CONFIG_FRAMEWORKS = {"hydra", "omegaconf"}
MATH = ["schedules", "gaussian", "losses", "likelihood", "sampling", "images", "paper_figures", "posthoc_ema", "nn",
        "errors"]
GLUE = ["module", "data", "callbacks", "metrics", "evaluation", "checkpointing", "distributed"]
HIGHER = {"module", "data", "callbacks", "metrics", "evaluation", "checkpointing", "distributed", "config", "run",
          "cli"}


def modules(name: str) -> list[Path]:
    """The files of a module (name.py) or a package (name/*.py)."""
    path = SRC / name
    files = sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    assert files and all(f.is_file() for f in files), name
    return files


def imported(path: Path) -> set[str]:
    """Every module a file imports (absolute imports only: the package uses no relative ones)."""
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


def ours(names: set[str]) -> set[str]:
    """Our own modules imported, by their first name under diffusion (diffusion.sampling.draw -> sampling)."""
    return {n.split(".")[1] for n in names if n.startswith("diffusion.") and n.count(".") >= 1}


@pytest.mark.parametrize("name", MATH)
def test_math_imports_no_framework_and_no_higher_layer(name):
    for path in modules(name):
        names = imported(path)
        assert not roots(names) & FRAMEWORKS, path
        assert not ours(names) & HIGHER, path


def test_nn_knows_nothing_of_schedules():
    for path in modules("nn"):
        names = imported(path)
        assert roots(names) <= {"torch", "math", "diffusion"}, path
        assert ours(names) <= {"nn", "errors"}, path
        text = path.read_text().lower()
        assert "beta" not in text and "alphas_cumprod" not in text, path


@pytest.mark.parametrize("name", GLUE)
def test_glue_takes_plain_objects(name):
    for path in modules(name):
        assert not roots(imported(path)) & CONFIG_FRAMEWORKS, path


@pytest.mark.parametrize("name", ["diffusers_format", "diffusers_unet"])
def test_diffusers_folders_need_neither_diffusers_nor_a_framework(name):
    for path in modules(name):
        names = imported(path)
        assert not roots(names) & (FRAMEWORKS | {"diffusers"}), path
        assert not ours(names) & HIGHER, path


def test_metrics_need_no_lightning():
    for path in modules("metrics"):
        assert not roots(imported(path)) & {"lightning", "pytorch_lightning"}, path


@pytest.mark.parametrize("package, allowed", [("callbacks", {"callbacks", "run"}), ("run", {"run"})])
def test_only_the_layers_above_import(package, allowed):
    exempt = {"cli.py": {"diffusion.run.job_status"}}  # guarded() writes each job's status.json
    for path in SRC.rglob("*.py"):
        if path.parent.name not in allowed:
            names = imported(path) - exempt.get(path.name, set())
            assert not any(n.startswith(f"diffusion.{package}") for n in names), path


def test_config_does_not_import_run():
    for path in modules("config"):
        assert "run" not in ours(imported(path)), path


def project_files() -> list[Path]:
    """The repository's own text files: hidden folders (.git, .venv), run outputs and data left out."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        skipped = ("outputs", "multirun", "data", "wandb", "__pycache__")
        dirs[:] = [d for d in dirs if (d == ".ci" or not d.startswith(".")) and d not in skipped
                   and not d.endswith(".egg-info")]
        texts = (".py", ".md", ".toml", ".yaml", ".yml", ".cfg")
        found += [Path(folder) / f for f in files if Path(f).suffix in texts or f in ("Makefile", "run")]
    return found


def test_no_file_points_at_documents_outside_the_repository():
    outside = re.compile("|".join(["STYLE" + r"\.md", "DEVELOPERS" + r"\.md"]))
    files = project_files()
    assert any(p.name == "Makefile" for p in files) and any(p.name == "run" for p in files)  # .ci/run too
    for path in files:
        assert not outside.search(path.read_text(errors="ignore")), path
