"""A sweep resumes as a whole: the same command again after its -m process died skips the finished jobs, resumes
the interrupted one from its last.ckpt and runs the rest; the report has one row per job."""

import csv
import subprocess
import sys
import time

import optuna
import pytest
import torch

from diffusion.run.jobs.status import read_status
from helpers import ROOT, run_script

BAD_INPUT_CASES = [  # (what, the part of the one line the tests check) for docs/bad_inputs.md
    ("train.py -m run again into a sweep folder whose job holds other overrides (e.g. another experiment=)",
     "holds a job run with other overrides"),
]
SWEEP = ["-m", "debug=fast", "callbacks.samples=null", "logger=none", "seed=0,1,2"]  # 3 jobs of 4 steps


@pytest.mark.slow
def test_a_sweep_run_again_after_its_process_was_killed_skips_resumes_and_runs_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), *SWEEP, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL of the -m process once job 1 has checkpointed: a login node gone, a laptop closed
    proc.wait()
    (job0,), (job1,) = sweep.glob("0_*"), sweep.glob("1_*")
    assert not list(sweep.glob("2_*"))
    assert read_status(job0)["status"] == "finished" and read_status(job1)["status"] == "running"
    killed_at = torch.load(job1 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < 4
    finished = (job0 / "status.json").read_bytes()
    job0_ckpt = (job0 / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"job 0: finished before ({job0 / 'status.json'}: step 4, " in again.stdout
    assert (job0 / "status.json").read_bytes() == finished  # not trained again: its status and wall time as they were
    assert (job0 / "checkpoints" / "last.ckpt").stat().st_mtime_ns == job0_ckpt
    assert f"resuming from {job1 / 'checkpoints' / 'last.ckpt'}" in again.stdout
    (job2,) = sweep.glob("2_*")
    for job in (job1, job2):
        assert read_status(job)["status"] == "finished" and read_status(job)["step"] == 4
    assert again.stdout.count("resuming from") == 1  # job 2 started afresh

    report = run_script("report.py", str(sweep), "--no-wandb", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    with (sweep / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3


@pytest.mark.slow
def test_an_optuna_sweep_run_again_replays_its_recorded_trials_and_goes_on(tmp_path):
    """Plain hydra/sweeper=optuna keeps its study in memory: run again with a seeded sampler, it proposes the same
    first trial, which is skipped with its recorded value, then a new one."""
    sweep = tmp_path / "sweep"
    optuna = ["-m", "debug=fast", "callbacks.samples=null", "logger=none", "hydra/sweeper=optuna",
              "hydra.sweeper.sampler.seed=0", "optimized_metric=val/loss", "seed=choice(0,1,2,3,4,5,6,7,8,9)",
              f"hydra.sweep.dir={sweep}"]
    first = run_script("train.py", *optuna, "hydra.sweeper.n_trials=1", cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    (trial0,) = [path.parent for path in sweep.rglob("status.json")]
    recorded = (trial0 / "status.json").read_bytes()
    again = run_script("train.py", *optuna, "hydra.sweeper.n_trials=2", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (trial0 / "status.json").read_bytes() == recorded and "job 0: finished before" in again.stdout
    statuses = [read_status(path.parent) for path in sweep.rglob("status.json")]
    assert len(statuses) == 2 and all(s["status"] == "finished" for s in statuses)
    best = float((sweep / "optimization_results.yaml").read_text().split("best_value:")[1].split()[0])
    assert best == min(s["metrics"]["val/loss"] for s in statuses)  # trial 0's recorded value reached the study


def test_a_sweep_run_again_with_another_command_stops_before_touching_a_job_folder(tmp_path):
    """experiment= is left out of the job folders' names, so `-m experiment=digits` and then `experiment=digits_cond`
    into the same sweep folder meet in job 0's folder: the second must not take the first's result as its own."""
    sweep = tmp_path / "sweep"
    common = ["-m", "debug=fast", "callbacks.samples=null", "logger=none", f"hydra.sweep.dir={sweep}"]
    first = run_script("train.py", *common, "experiment=digits", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (job0,) = sweep.glob("0_*")
    recorded = (job0 / "status.json").read_bytes()
    again = run_script("train.py", *common, "experiment=digits_cond", cwd=tmp_path)
    assert again.returncode == 2, again.stderr[-3000:]
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith(f"error: job 0's folder {job0} {BAD_INPUT_CASES[0][1]} (")
    assert "(debug=fast callbacks.samples=null logger=none experiment=digits) than this one (debug=fast " \
           "callbacks.samples=null logger=none experiment=digits_cond); a sweep resumes only when run again" in line
    assert (job0 / "status.json").read_bytes() == recorded and "finished before" not in again.stdout


@pytest.mark.slow
def test_an_optuna_sweep_killed_mid_trial_goes_on_with_its_stored_study(tmp_path):
    """hydra/sweeper=resumable_optuna (experiment=optuna_digits) keeps the study in the sweep's optuna.db: run
    again after the -m process was killed in trial 1, trial 0 is kept (not run again), trial 1 resumes in its
    own folder from its last.ckpt and its value reaches the study, and no third trial is asked."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "experiment=optuna_digits", "debug=fast", "logger=none",
           "callbacks.samples=null", "callbacks.quality=null", "optimized_metric=val/loss", "model.ch=16",
           "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=2", "hydra.sweeper.n_trials=2",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(sweep.glob("1_*/checkpoints/last.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    (job0,), (job1,) = sweep.glob("0_*"), sweep.glob("1_*")
    assert read_status(job0)["status"] == "finished" and read_status(job1)["status"] == "running"
    finished = (job0 / "status.json").read_bytes()

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"study optuna_digits in sqlite:///{sweep}/optuna.db: 1 trial(s) ended before and are kept; 1 cut off, "
            "run again in their folders; 0 new") in again.stdout
    assert f"resuming from {job1 / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert (job0 / "status.json").read_bytes() == finished and not list(sweep.glob("2_*"))
    losses = [read_status(job)["metrics"]["val/loss"] for job in (job0, job1)]
    assert read_status(job1)["status"] == "finished" and read_status(job1)["step"] == 8
    best = float((sweep / "optimization_results.yaml").read_text().split("best_value:")[1].split()[0])
    assert best == min(losses)
    study = optuna.load_study(study_name="optuna_digits", storage=f"sqlite:///{sweep}/optuna.db")
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", losses[0]), ("COMPLETE", losses[1])]
