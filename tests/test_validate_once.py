"""A command validates its config once: the entry point's precheck checks the schema rules and cross-field rules of
every job (and the samplers against the objective where it is known), the job then checks only what needs the
environment or the checkpoint. Counted on real runs of the entry points, in a fresh process each."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT

# Runs an entry point in this process and prints how often each watched function of the package was called.
COUNTER = """
import collections, json, sys, threading
entry, out, *args = sys.argv[1:]
sys.argv = [entry + ".py", *args]
counts = collections.Counter()
WATCH = {"validate", "validate_entry", "check", "check_for", "check_samplers"}
def profile(frame, event, arg):
    code = frame.f_code
    if event == "call" and code.co_name in WATCH and "diffusion" in code.co_filename:
        counts[code.co_filename.replace("\\\\", "/").split("src/diffusion/")[-1] + ":" + code.co_name] += 1
sys.setprofile(profile)
threading.setprofile(profile)
import diffusion.run.entry as entry_points
try:
    getattr(entry_points, entry + "_main")()
except SystemExit as done:
    status = done.code
else:
    status = 0
sys.setprofile(None)
json.dump({"status": status, "counts": counts}, open(out, "w"))
"""


def counted(entry: str, *args: str, tmp_path) -> dict[str, int]:
    out = tmp_path / f"{entry}.json"
    result = subprocess.run([sys.executable, "-c", COUNTER, entry, str(out), *args], cwd=tmp_path, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0 and out.is_file(), result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["status"] in (0, None), result.stderr[-3000:]
    return found["counts"]


@pytest.mark.slow
def test_train_validates_once_and_checks_each_sampler_once(tmp_path):
    counts = counted("train", "debug=fast", "logger=none", "trainer.max_steps=2", "callbacks.quality.at_train_end=true",
                     "callbacks.quality.extra_samplers=[{name: heun, steps: 3}]", f"hydra.run.dir={tmp_path}/run",
                     tmp_path=tmp_path)
    assert counts["config/validation.py:validate"] == 1
    # the sampler nodes: samples.sampler, samples.final_sampler, quality.sampler, quality.extra_samplers[0],
    # figures.sampler: each checked once, and against the objective once
    assert counts["core/sampling/spec.py:check"] == 5
    assert counts["core/sampling/spec.py:check_for"] == 5
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_sample_checks_its_sampler_once_and_against_the_checkpoints_objective_once(tmp_path):
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", "logger=none", "trainer.max_steps=2",
                            f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    counts = counted("sample", f"ckpt={run}/checkpoints/last.ckpt", "num_samples=4", "batch_size=4",
                     "sampler.name=heun", "sampler.steps=3", f"hydra.run.dir={tmp_path}/samples", tmp_path=tmp_path)
    assert counts["config/validation.py:validate_entry"] == 1
    assert counts["core/sampling/spec.py:check"] == 1 and counts["core/sampling/spec.py:check_for"] == 1
    assert (tmp_path / "samples" / "samples.npz").is_file()
