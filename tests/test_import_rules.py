"""Who may import whom: the layers are the folders of src/diffusion, each floor looking only down.

A module's layer is the deepest folder of FLOORS that holds it (src/diffusion/core/sampling/draw.py is in
core/sampling). A module imports its own folder and the floors below it, never a folder beside it on its own
floor nor anything above. Every module lives in a listed folder, so a new folder must be given its floor here.

    errors                  the one exception type
    files, rules            outputs written whole (a failed write: a UserError); the rules schemas beside defaults
    core, nn                plain PyTorch: the diffusion math; the U-Net (which knows nothing of schedules)
    core/sampling           samplers over a denoiser, their registry, guidance, draw()
    data, formats           DataModules and readers; files in and out (diffusers folders, PNG)
    metrics, figures        feature extractors and scores; the paper's figures
    lightning               the LightningModule, evaluation loop, checkpoints, DDP, logger
    lightning/callbacks     what training could run without
    config                  schemas, their rules, the one validation pass
    run/jobs                a job's plumbing: precheck, guard, status, lock, signals, preflight, console
    run/reports             what commands write about runs (sweep report, tables, model card)
    run/commands            one module per command
    run                     the entry points (entry.py, worker.py)
"""

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "diffusion"
FLOORS = [{"errors"}, {"files", "rules"}, {"core", "nn"}, {"core/sampling"}, {"data", "formats"},
          {"metrics", "figures"}, {"lightning"}, {"lightning/callbacks"}, {"config"}, {"run/jobs"}, {"run/reports"},
          {"run/commands"}, {"run"}]
FLOOR = {folder: i for i, floor in enumerate(FLOORS) for folder in floor}
FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "torchmetrics"}
CONFIG_FRAMEWORKS = {"hydra", "omegaconf"}


def sources() -> list[Path]:
    """Every module of the package (its __init__ and the Hydra configs' folder aside)."""
    return sorted(p for p in SRC.rglob("*.py") if p.parent not in (SRC, SRC / "conf") or p.name != "__init__.py")


def layer(path: Path) -> str:
    """The deepest listed folder holding a module (src/diffusion/errors.py is 'errors')."""
    parts = path.relative_to(SRC).with_suffix("").parts
    for depth in range(len(parts), 0, -1):
        candidate = "/".join(parts[:depth])
        if candidate in FLOOR:
            return candidate
    raise AssertionError(f"{path.relative_to(ROOT)} is in no layer folder; give its folder a floor in FLOORS")


def module_layer(name: str) -> str | None:
    """The layer of an imported `diffusion.x.y` module or attribute (None for the package itself)."""
    parts = name.split(".")[1:]
    for depth in range(len(parts), 0, -1):
        candidate = "/".join(parts[:depth])
        if candidate in FLOOR:
            return candidate
    return None


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, line) of every import in a file; with top_level_only, those outside functions."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if top_level_only and id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path} uses a relative import"
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name, _ in imports(path)}


def test_every_module_is_in_a_layer_folder():
    folders = {layer(p) for p in sources()}
    assert folders == set(FLOOR), f"floors without modules: {set(FLOOR) - folders}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_look_down(path):
    """Own folder or a lower floor: never a sibling folder on the same floor, never above."""
    here = layer(path)
    for name, line in imports(path):
        if not name.startswith("diffusion."):
            continue
        there = module_layer(name)
        if there is None or there == here:
            continue
        assert FLOOR[there] < FLOOR[here], f"{path.relative_to(ROOT)}:{line} ({here}) imports {name} ({there})"


def test_core_and_nn_are_plain_pytorch():
    for path in sources():
        if layer(path).split("/")[0] in ("core", "nn"):
            assert not roots(path) & (FRAMEWORKS | {"torchvision", "matplotlib", "diffusers"}), path


def test_nn_knows_nothing_of_schedules_or_objectives():
    for path in sources():
        if layer(path) == "nn":
            assert roots(path) <= {"torch", "math", "diffusion"}, path
            text = path.read_text().lower()
            assert "beta" not in text and "alphas_cumprod" not in text and "sigma" not in text, path


def test_layers_below_config_take_plain_objects():
    for path in sources():
        if FLOOR[layer(path)] < FLOOR["config"]:
            assert not roots(path) & CONFIG_FRAMEWORKS, path


def test_metrics_and_formats_need_no_framework():
    for path in sources():
        if layer(path) == "metrics":
            assert not roots(path) & {"lightning", "pytorch_lightning"}, path
        if layer(path) == "formats":
            assert not roots(path) & (FRAMEWORKS | {"diffusers"}), path  # diffusers is a dev dependency


def test_no_import_of_our_modules_inside_a_function():
    """An import inside a function hides the dependency (and a cycle). The entry points are the one exception:
    they import a command when its job starts, so that a mistake on the command line is answered quickly."""
    for path in sources():
        if path.relative_to(SRC).as_posix() in ("run/entry.py",):
            continue
        inner = set(imports(path)) - set(imports(path, top_level_only=True))
        ours = sorted(f"{name} (line {line})" for name, line in inner if name.startswith("diffusion"))
        assert not ours, f"{path.relative_to(ROOT)} imports inside a function: {ours}"


def test_no_private_name_is_used_across_modules():
    """`from x import _name` only within a module's own package: a name with an underscore is the module's own."""
    for path in sources():
        for name, line in imports(path):
            module, _, attr = name.rpartition(".")
            if name.startswith("diffusion.") and attr.startswith("_") and not attr.startswith("__"):
                assert module.rpartition(".")[0] == f"diffusion.{layer(path).replace('/', '.')}" or \
                    module == f"diffusion.{layer(path).replace('/', '.')}", f"{path.relative_to(ROOT)}:{line} {name}"


def project_files() -> list[Path]:
    """The repository's own text files: hidden folders (.git, .venv), run outputs and data left out."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        skipped = ("outputs", "multirun", "data", "wandb", "__pycache__")
        dirs[:] = [d for d in dirs if (d == ".ci" or not d.startswith(".")) and d not in skipped
                   and not d.endswith(".egg-info") and not (Path(folder) / d).is_symlink()]
        texts = (".py", ".md", ".toml", ".yaml", ".yml", ".cfg")
        found += [Path(folder) / f for f in files if Path(f).suffix in texts or f in ("Makefile", "run")]
    return found


def test_no_file_points_at_documents_outside_the_repository():
    outside = re.compile("|".join(["STYLE" + r"\.md", "DEVELOPERS" + r"\.md"]))
    files = project_files()
    assert any(p.name == "Makefile" for p in files) and any(p.name == "run" for p in files)  # .ci/run too
    for path in files:
        assert not outside.search(path.read_text(errors="ignore")), path
