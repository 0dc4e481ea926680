"""Bad input through the real entry points: one line naming the value and the fix, exit status 2."""

import pytest

from helpers import run_script

CASES = [
    # (overrides, fragments the one-line message must contain)
    (["trainer.max_stepz=3"], ["unknown config key 'trainer.max_stepz'", "did you mean trainer.max_steps?"]),
    (["+trainer.foo=1"], ["unknown config key 'trainer.foo'", "'+' cannot add one"]),
    (["schedule=cosin"], ["schedule=cosin is not an option of group 'schedule'", "'cosine'"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps must be of type", "got 'abc'"]),
    (["data=image_folder"], ["data.root has no value and is required; set data.root="]),
    (["schedule.beta_end=1.5"], ["schedule.beta_end must be in (0, 1), got 1.5",
                                 "try schedule.beta_end=0.02"]),
    (["schedule.num_timesteps=0"], ["schedule.num_timesteps must be in [1, 100000], got 0",
                                    "try schedule.num_timesteps=1000"]),
    (["optim.optimizer.lr=-1"], ["optim.optimizer.lr must be a number > 0, got -1.0", "try optim.optimizer.lr=0.0002"]),
    (["callbacks.ema.decay=1.5"], ["callbacks.ema.decay must be in [0, 1), got 1.5"]),
    (["data.batch_size=0"], ["data.batch_size must be in [1, 65536], got 0", "try data.batch_size=128"]),
    (["objective.loss=l1"], ["objective.loss must be one of ['simple', 'vlb', 'hybrid'], got l1",
                              "try objective.loss=simple"]),
    (["diffusion.parameterization=v"], ["diffusion.parameterization moved to objective.parameterization",
                                        "write objective.parameterization=v"]),
    (["objective=edm", "schedule=cosine"], ["schedule=cosine is DDPM's beta schedule, but objective=edm",
                                            "drop schedule=cosine"]),
    (["objective=flow", "callbacks.quality.sampler.name=respaced"],
     ["callbacks.quality.sampler.name=respaced walks DDPM's Markov chain", "objective=flow has none"]),
    (["trainer.accelerator=gpu"], ["no CUDA GPU is visible; use trainer=cpu"]),
    (["data=mnist", "data.image_size=30"], ["model.image_size=30", "not divisible"]),
    (["ckpt_path=/nonexistent/last.ckpt"], ["ckpt_path /nonexistent/last.ckpt does not exist"]),
    (["init_from=/nonexistent/model"], ["init_from /nonexistent/model does not exist", "a local diffusers folder"]),
    (["init_from=/nonexistent/model", "ckpt_path=/nonexistent/last.ckpt"],
     ["are both set: ckpt_path resumes a run (weights, optimizer, step count)", "drop one"]),
    # a chain that ends short of noise; what ran is what is recorded
    (["schedule.num_timesteps=100", "training.max_prior_bpd=0.001"],
     ["T=100 does not reach noise", "above training.max_prior_bpd=0.001", "use schedule=linear_scaled"]),
    (["schedule=linear_scaled", "schedule.num_timesteps=10"], ["reaches 1 at schedule.num_timesteps=10",
                                                                "use schedule.num_timesteps=21"]),
    (["model.num_classes=10", "training.cond_drop_prob=1.0"], ["training.cond_drop_prob=1.0",
                                                               "use training.cond_drop_prob=0.1"]),
    (["schedule=explicit", "schedule.betas=[0.1,0.5,0.9]", "schedule.num_timesteps=5"],
     ["schedule.num_timesteps=5 differs from the 3 betas", "set schedule.num_timesteps=null"]),
]


def check_one_line_error(result, fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.mark.parametrize("overrides, fragments", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line(overrides, fragments, tmp_path):
    result = run_script("train.py", "debug=fast", "logger=none", *overrides, f"hydra.run.dir={tmp_path}",
                        cwd=tmp_path)
    check_one_line_error(result, fragments)


SAMPLER_CASES = [
    # (entry point, arguments, fragments of the one line): the same sampler keys everywhere, checked at once
    ("train.py", ["callbacks.samples.sampler.name=ddmi"], ["callbacks.samples.sampler.name=ddmi is not a sampler",
                                                          "did you mean callbacks.samples.sampler.name=ddim?"]),
    ("train.py", ["callbacks.quality.sampler.name=ddpm", "callbacks.quality.sampler.steps=5"],
     ["callbacks.quality.sampler.steps=5 is not used by callbacks.quality.sampler.name=ddpm",
      "callbacks.quality.sampler.name=respaced callbacks.quality.sampler.steps=5"]),
    ("train.py", ["callbacks.samples.sampler.steps=50"], ["callbacks.samples.sampler.steps=50 exceeds the model's "
                                                         "T=20 steps"]),
    ("sample.py", ["sampler.name=ddmi"], ["sampler.name=ddmi is not a sampler", "['ddpm', 'ddim', 'euler', "
                                          "'respaced', 'dpmpp_2m', 'dpmpp_2m_sde', 'unipc', 'heun', 'ipndm', 'deis', "
                                          "'deis_logrho', 'consistency']"]),
    ("sample.py", ["sampler.name=ddpm", "sampler.steps=5", "sampler.eta=0.7", "sampler.spacing=trailing"],
     ["sampler.steps=5 is not used by sampler.name=ddpm", "use sampler.name=respaced sampler.steps=5"]),
    ("sample.py", ["sampler=ddim"], ["sampler is a group of settings; write sampler.name=ddim"]),
    ("sample.py", ["steps=50"], ["sampler settings are under sampler: write sampler.steps=..."]),
    ("evaluate.py", ["sampler.name=respaced", "sampler.eta=0.5"], ["sampler.eta=0.5 is not used by "
                                                                   "sampler.name=respaced", "sampler.name=ddim"]),
    ("evaluate.py", ["sampler_table.enabled=true", "sampler_table.samplers=[{name: ddim, steps: 0}]"],
     ["sampler_table.samplers[0].steps must be an integer >= 1, got 0"]),
    ("figures.py", ["sampler.name=dpm"], ["sampler.name=dpm is not a sampler"]),
    # the fast samplers: their settings, spacings and orders, checked by the same config walk
    ("sample.py", ["sampler.name=unipc", "sampler.steps=4", "sampler.order=3"],
     ["sampler.order=3 needs sampler.steps >= 5", "use sampler.order=2 or sampler.steps=5"]),
    ("evaluate.py", ["sampler.name=dpmpp_2m", "sampler.spacing=leading"],
     ["sampler.spacing=leading is not a spacing of sampler.name=dpmpp_2m", "never reach index T-1"]),
    ("figures.py", ["sampler.name=heun", "sampler.order=2"], ["sampler.order=2 is not used by sampler.name=heun",
                                                              "use sampler.name=unipc sampler.order=2"]),
    ("train.py", ["callbacks.samples.sampler.name=dpmpp_2m_sde", "callbacks.samples.sampler.eta=-1"],
     ["callbacks.samples.sampler.eta must be >= 0, got -1.0"]),
    ("train.py", ["callbacks.quality.extra_samplers=[{name: dpmpp_2m, steps: 10}, {name: heun, steps: 41}]"],
     ["callbacks.quality.extra_samplers[1].steps=41 exceeds what the model's T=20 steps allow "
      "callbacks.quality.extra_samplers[1].name=heun", "at most 40"]),
    ("evaluate.py", ["sampler_table.enabled=true", "sampler_table.samplers=[{name: unipc, steps: 3, order: 3}]"],
     ["sampler_table.samplers[0].order=3 needs sampler_table.samplers[0].steps >= 5"]),
]


@pytest.mark.parametrize("script, args, fragments", SAMPLER_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in SAMPLER_CASES])
def test_sampler_mistakes_are_one_line_before_anything_is_built(script, args, fragments, tmp_path):
    """A missing checkpoint would be the next error: the sampler's comes first, at composition."""
    extra = ["debug=fast", "logger=none"] if script == "train.py" else ["ckpt=/nonexistent/last.ckpt"]
    result = run_script(script, *extra, *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    check_one_line_error(result, fragments)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "samples.npz").exists()


def test_a_path_into_a_sweeps_job_folder_is_named_with_its_quoted_spelling(tmp_path):
    """A -m sweep's job folders hold '=' and ',' (1_objective=edm,seed=0): Hydra reads such a value only quoted."""
    ckpt = "multirun/objectives/1_objective=edm,seed=0/checkpoints/last.ckpt"
    result = run_script("sample.py", f"ckpt={ckpt}", cwd=tmp_path)
    check_one_line_error(result, [f"ckpt={ckpt} cannot be read", f"write ckpt='{ckpt}'"])
    quoted = run_script("sample.py", f"ckpt='{ckpt}'", cwd=tmp_path)  # read: the next error is the missing file
    check_one_line_error(quoted, [f"ckpt {ckpt} does not exist"])


def test_missing_dataset_names_path_and_download_switch(tmp_path):
    result = run_script("train.py", "debug=fast", "logger=none", "data=mnist", f"data.root={tmp_path / 'nope'}",
                        f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    check_one_line_error(result, [str(tmp_path / "nope"), "data.download=true"])


def test_multirun_sweep_values_are_checked_too(tmp_path):
    result = run_script("train.py", "-m", "debug=fast", "schedule=linear,cosin", f"hydra.sweep.dir={tmp_path}",
                        cwd=tmp_path)
    check_one_line_error(result, ["not an option of group 'schedule'"])


def test_full_traceback_on_request(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "schedule.beta_end=1.5", "debug=fast",
                             "logger=none", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_readme_table_lists_every_case():
    """docs/bad_inputs.md is generated from CASES by docs/bad_input_table.py: regenerate it when they change.
    The README quotes its count."""
    import re

    from helpers import ROOT

    table = (ROOT / "docs" / "bad_inputs.md").read_text()
    for overrides, fragments in CASES:
        row = next((line for line in table.splitlines()
                    if line.startswith(f"| `train.py` | `debug=fast logger=none {' '.join(overrides)}` |")), None)
        assert row is not None, f"{overrides} missing: run docs/bad_input_table.py"
        assert all(fragment.replace("|", "\\|") in row for fragment in fragments), row
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| script")
            and not line.startswith("| fault")]
    count = int(re.search(r"\*\*(\d+) bad inputs\*\*", table).group(1))
    assert count == len(rows)
    assert f"**{count} bad inputs**" in (ROOT / "README.md").read_text()
