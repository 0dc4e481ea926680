"""The package runs from a non-editable install: its Hydra configs ship inside it (diffusion/conf), and the
console scripts (diffusion-train, diffusion-sample, ...) work from any folder, with no clone in sight."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_non_editable_install_trains_and_samples_from_another_folder(tmp_path):
    # a copy of what a source distribution holds, so the build leaves nothing in the repository
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--no-build-isolation", "--target", str(site), str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not (site / "diffusion" / "conf" / "train.yaml").is_symlink()
    assert (site / "diffusion" / "conf" / "objective" / "edm.yaml").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, capture_output=True, text=True, timeout=600,
                              env=env)

    where = run("-c", "import diffusion; print(diffusion.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr  # not the clone's src/
    plugin = run("-c", "import hydra_plugins.diffusion_sweepers.resumable_optuna as m; print(m.__file__)")
    assert Path(plugin.stdout.strip()).is_relative_to(site), plugin.stdout + plugin.stderr  # the sweeper plugin
    script = site / "bin" / "diffusion-train"
    train = run(str(script), "debug=fast", "logger=none", "trainer.max_steps=2", "hydra.run.dir=run")
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = elsewhere / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    sample = run(str(site / "bin" / "diffusion-sample"), f"ckpt={ckpt}", "num_samples=4", "batch_size=4",
                 "hydra.run.dir=samples")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert np.load(elsewhere / "samples" / "samples.npz")["samples"].shape == (4, 8, 8, 1)
    bad = run(str(script), "objective=edmm")  # a config error is still one line, found in the installed tree
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
