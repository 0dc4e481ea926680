"""The extension points, exercised for real on a copy of the package with nothing else edited:

- a new objective is one module in core/objectives/ and one YAML in conf/objective/ (here: EDM with a wider
  training distribution, declaring its schema); the entry points train with it, refuse a bad value of its own
  setting in one line, and sample from its checkpoint with the solvers;
- a new sampler is one module in core/sampling/ and one entry of SAMPLERS (here: a second-order Adams-Bashforth
  step in σ); train.py's grids, sample.py and the checks take it by name.

(A new score is one entry of SCORES: tests/test_scores.py.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

MODULE = '''
from dataclasses import dataclass

from diffusion.core.objectives.edm import EDM, EDMObjectiveConfig
from diffusion.rules import checked, positive


@dataclass
class WideEDMConfig(EDMObjectiveConfig):
    _target_: str = "diffusion.core.objectives.wide_edm.WideEDM"
    p_std: float = checked(2.0, positive())  # ln σ spread wider than EDM's 1.2


class WideEDM(EDM):
    name = "wide_edm"
'''
YAML = '''defaults:
  - base_objective_wide_edm
  - override /schedule@_global_.schedule: none
'''


SAMPLER = '''
import torch

from diffusion.core.sampling.common import Recorder, level_names, require_finite_start


def ab2_sample(denoiser, x_T, *, num_steps=None, spacing="karras", generator=None, record_steps=None):
    """Two-step Adams-Bashforth on dx̃/dσ = (x̃ - D)/σ over the grid's levels (one network call each)."""
    g = denoiser.grid(spacing, num_steps, from_top=True)
    require_finite_start(g, "ab2")
    s, names, last = g.sigma, level_names(denoiser, g), g.num_levels - 1
    recorder, x, d_prev = Recorder(record_steps), x_T / g.alpha[0], None
    for i in range(last):
        x0 = denoiser(g.alpha[i] * x, s[i])
        recorder(names[i], g.alpha[i] * x, x0)
        d, h = (x - x0) / s[i], s[i + 1] - s[i]
        x = x + h * (d if d_prev is None else d + h / (2 * h_prev) * (d - d_prev))
        d_prev, h_prev = d, h
    x0 = denoiser(g.alpha[last] * x, s[last])
    recorder(names[last], g.alpha[last] * x, x0)
    return recorder.output(x0)
'''
ENTRY = '''
from diffusion.core.sampling.ab2 import ab2_sample  # noqa: E402

SAMPLERS["ab2"] = SamplerKind(ab2_sample, {"steps": 20, "spacing": "karras"}, "Adams-Bashforth 2 in σ, `steps` calls",
                              SOLVER_SPACINGS, finite_start=True, from_top=True, in_table=True)
'''


def package_copy(tmp_path: Path):
    """A copy of the package and a runner of its entry points (python -c, the copy first on the path)."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "src" / "diffusion", site / "diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(entry: str, *args: str) -> subprocess.CompletedProcess:
        code = f"import sys; from diffusion.run.entry import {entry}_main; sys.argv[0] = '{entry}.py'; {entry}_main()"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env=env)

    return site / "diffusion", run


@pytest.mark.slow
def test_one_module_and_one_yaml_make_an_objective_every_command_takes(tmp_path):
    package, run = package_copy(tmp_path)
    (package / "core" / "objectives" / "wide_edm.py").write_text(MODULE)
    (package / "conf" / "objective" / "wide_edm.yaml").write_text(YAML)

    bad = run("train", "objective=wide_edm", "objective.p_std=-1")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: objective.p_std must be a number > 0, got -1.0; try objective.p_std=2.0", bad.stderr
    train = run("train", "objective=wide_edm", "debug=fast", "logger=none", "trainer.max_steps=2", "hydra.run.dir=run")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "objective=wide_edm" in train.stdout
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for sampler in ("sampler.name=heun sampler.steps=5", "sampler.name=dpmpp_2m sampler.steps=4"):
        sample = run("sample", f"ckpt={ckpt}", "num_samples=4", "batch_size=4", *sampler.split(),
                     f"hydra.run.dir=samples-{sampler.split()[0][13:]}")
        assert sample.returncode == 0, sample.stderr[-3000:]
        images = np.load(tmp_path / f"samples-{sampler.split()[0][13:]}" / "samples.npz")["samples"]
        assert images.shape == (4, 8, 8, 1)
    refused = run("sample", f"ckpt={ckpt}", "num_samples=4", "sampler.name=ddpm", "hydra.run.dir=refused")
    assert refused.returncode == 2 and "objective=wide_edm has none" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_one_module_and_one_registry_entry_make_a_sampler_every_command_takes(tmp_path):
    package, run = package_copy(tmp_path)
    (package / "core" / "sampling" / "ab2.py").write_text(SAMPLER)
    spec = package / "core" / "sampling" / "spec.py"
    spec.write_text(spec.read_text() + ENTRY)
    train = run("train", "debug=fast", "logger=none", "trainer.max_steps=2", "callbacks.samples.sampler.name=ab2",
                "callbacks.samples.sampler.steps=4", "hydra.run.dir=run")
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step0000002.png").is_file()
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    sample = run("sample", f"ckpt={ckpt}", "num_samples=4", "batch_size=4", "sampler.name=ab2", "sampler.steps=6",
                 "hydra.run.dir=samples")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert np.load(tmp_path / "samples" / "samples.npz")["samples"].shape == (4, 8, 8, 1)
    for args, line in [
        (["sampler.name=ab2", "sampler.eta=0.5"], "error: sampler.eta=0.5 is not used by sampler.name=ab2"),
        (["sampler.name=ba2"], "error: sampler.name=ba2 is not a sampler; did you mean sampler.name=ab2?"),
    ]:
        refused = run("sample", f"ckpt={ckpt}", "num_samples=4", *args, "hydra.run.dir=refused")
        assert refused.returncode == 2 and refused.stderr.startswith(line), refused.stderr
