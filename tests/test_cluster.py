"""Sweeps and clusters: the SLURM launcher's sbatch script, submitit's local executor with a preempted and
requeued job, an Optuna study, and every job of the Table 2 ablation sweep training for real.

SLURM itself is simulated where needed by small executables first on PATH (sbatch); submitit's local
executor is the real thing: it runs each job in its own process, signals and requeues as on a cluster.
"""

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from diffusion.config import register_configs
from diffusion.errors import UserError
from diffusion.lightning.callbacks.interrupt import GracefulInterrupt, slurm_job_id
from diffusion.run.commands.train import train
from diffusion.run.jobs.precheck import CONF_DIR
from helpers import ROOT, train_cfg

QUIET = ["debug=fast", "logger=none", "callbacks.samples=null"]


def job_env(env: dict | None = None) -> dict:
    """One thread per training process (jobs side by side on 2 cores do not fight over both), and submitit's
    default requeue signal whatever the calling shell says."""
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    return env


def fake_executable(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def run_train(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          env=job_env(env), capture_output=True, text=True, timeout=timeout)


def test_slurm_launcher_asks_sbatch_for_one_task_per_gpu_and_the_requeue_signal(tmp_path):
    """hydra/launcher=slurm through submitit's real SLURM executor, up to the sbatch call (a fake that records)."""
    script = tmp_path / "submitted.sh"
    fake_executable(tmp_path / "bin", "sbatch", f'cat "$1" > {script}\necho "sbatch: error: simulated" >&2\nexit 1')
    fake_executable(tmp_path / "bin", "srun", "exit 1")  # submitit checks that it exists; the job never runs
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = run_train("-m", "hydra/launcher=slurm", *QUIET, "trainer=ddp", "trainer.num_nodes=2",
                     "hydra.launcher.gpus_per_node=4", "hydra.launcher.account=proj42",
                     "hydra.launcher.partition=gpu", "schedule=linear,cosine", cwd=tmp_path, env=env, timeout=300)
    assert done.returncode != 0 and "simulated" in done.stderr  # nothing was queued
    flags = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem-per-gpu=32G",
                 "--time=1440", "--signal=USR2@300", "--requeue", "--account=proj42", "--partition=gpu",
                 "--array=0-1%2"):
        assert f"#SBATCH {flag}" in flags, (flag, flags)
    assert "srun" in script.read_text() and "submitit.core._submit" in script.read_text()


def _pid_with_open_file(path: Path) -> int | None:
    """The process that holds `path` open (Hydra's job log stays open while the job runs), from /proc."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the job's process through /proc")
def test_submitit_local_sweep_runs_each_job_in_its_own_dir_and_requeues_a_preempted_one(tmp_path):
    """Two jobs through submitit's LocalExecutor. Job 0 gets SIGUSR2 (what SLURM sends before the time limit)
    mid-training: it saves last.ckpt, submitit requeues it, and the restarted job resumes and finishes."""
    steps = 120
    # Its own process group: submitit's job controllers outlive train.py, and a failed test must not leave them.
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", *QUIET,
                             "name=local", f"trainer.max_steps={steps}", "trainer.val_check_interval=100000",
                             "callbacks.checkpoint.every_n_train_steps=20", "schedule=linear,cosine"],
                            cwd=tmp_path, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, pid = time.time() + 180, None
        while pid is None and time.time() < deadline and proc.poll() is None:
            job0 = next(tmp_path.glob("multirun/local/*/0_*"), None)
            if job0 is not None and (job0 / "checkpoints" / "step0000020.ckpt").exists():
                pid = _pid_with_open_file(job0 / "train.log")
            time.sleep(0.2)
        assert pid is not None, "job 0 did not start training"
        os.kill(pid, signal.SIGUSR2)
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the sweep: nothing, when it passed
    assert proc.returncode == 0, stderr[-3000:]
    [sweep] = tmp_path.glob("multirun/local/*")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    # submitit's logs, one folder per job: stderr has our line, stdout submitit's requeue and train()'s resume
    logs = {p.parent.name: (p.read_text(), p.with_suffix(".out").read_text())
            for p in sweep.glob(".submitit/*/*_0_log.err")}
    ckpt0 = jobs[0] / "checkpoints" / "last.ckpt"
    [(err, out)] = [log for log in logs.values() if "stopped by SIGUSR2" in log[0]]
    assert "stopped by SIGUSR2 at step" in err and f"checkpoint saved to {ckpt0}" in err
    assert "Requeued job" in out and f"resuming from {ckpt0}" in out
    assert sum("resuming from" in out for _, out in logs.values()) == 1  # job 1 ran once, from the start


@pytest.mark.slow
def test_optuna_study_runs_its_trials_and_writes_the_best(tmp_path):
    done = run_train("-m", "experiment=optuna_digits", *QUIET, "hydra.sweeper.n_trials=2",
                     "optimized_metric=val/loss", "schedule.num_timesteps=choice(25,30)", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [sweep] = tmp_path.glob("multirun/optuna_digits/*")
    assert sorted(p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()) == ["0", "1"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and 0 < best["best_value"] < 10
    params = best["best_params"]
    assert 1e-4 <= params["optim.optimizer.lr"] <= 1e-2 and params["schedule"] in ("linear_scaled", "cosine")
    assert params["schedule.num_timesteps"] in (25, 30)


@pytest.mark.slow
def test_optuna_study_minimizes_the_experiments_own_val_fid(tmp_path):
    """experiment=optuna_digits as shipped (optimized_metric=val/fid): each trial scores its samples at the end,
    and the study's best value is the smallest of the val/fid its trials wrote to their status.json."""
    import json

    done = run_train("-m", "experiment=optuna_digits", *QUIET, "hydra.sweeper.n_trials=2",
                     "schedule.num_timesteps=choice(25,30)", "callbacks.quality.at_train_end=true",
                     "callbacks.quality.num_samples=12", "callbacks.quality.max_reference_images=48", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [sweep] = tmp_path.glob("multirun/optuna_digits/*")
    statuses = [json.loads((job / "status.json").read_text()) for job in sorted(sweep.glob("[0-9]*"))]
    assert len(statuses) == 2 and all(s["status"] == "finished" for s in statuses)
    fids = [s["quality"]["val/fid"] for s in statuses]
    assert fids[0] != fids[1]
    # The objective is train()'s metrics["val/fid"]: the trainer's callback_metrics, a float32 of the score.
    assert [s["metrics"]["val/fid"] for s in statuses] == pytest.approx(fids, rel=1e-6)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(fids), rel=1e-6)
    assert best["best_value"] == min(s["metrics"]["val/fid"] for s in statuses)
    assert best["best_params"]["schedule.num_timesteps"] == statuses[fids.index(min(fids))]["quality_protocol"][
        "num_timesteps"]


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The overrides of every job of an experiment's grid sweep (hydra.sweeper.params), as Hydra expands it."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", [f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    return [[f"{k}={v}" for k, v in zip(params, values, strict=True)]
            for values in itertools.product(*(str(v).split(",") for v in params.values()))]


@pytest.fixture
def one_thread():
    """Tiny nets train fastest on one thread, and a second one only fights other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_table2_job_trains(tmp_path, one_thread):
    jobs = sweep_jobs("table2_ablation")
    assert len(jobs) == 8
    for i, job in enumerate(jobs):
        cfg = train_cfg(tmp_path / str(i), "experiment=table2_ablation", *QUIET, *job, "trainer.max_steps=1",
                        "trainer.val_check_interval=100000")
        train(cfg)
        state = torch.load(tmp_path / str(i) / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] == 1
        if cfg.objective.variance == "learned_range":
            # L_simple has no variance term: the variance half of the zero-initialised output conv stays 0
            # (Σ fixed at sqrt(β β̃)), as the experiment file says; the bound trains it.
            var_rows = state["state_dict"]["net.conv_out.weight"][1:]  # 1 channel: rows [mean | variance]
            assert (var_rows.abs().max() == 0) == (cfg.objective.loss == "simple"), job


def test_slurm_job_id_names_array_tasks_as_scontrol_wants(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "901")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "901"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert slurm_job_id() == "900_1"


def test_requeue_signal_follows_submitit_and_rejects_what_is_not_one(monkeypatch):
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert GracefulInterrupt().requeue_signal == signal.SIGUSR2
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # submitit then asks sbatch for --signal=USR1@...
    assert GracefulInterrupt().requeue_signal == signal.SIGUSR1
    with pytest.raises(UserError, match=r"got 'SIGTERM'; use SIGUSR2") as err:
        GracefulInterrupt("SIGTERM")
    assert "\n" not in str(err.value)


def test_table2_scores_with_an_ancestral_sampler_that_uses_sigma():
    """DDIM at η=0 never uses Σ, so it would score the fixed-Σ and learned-Σ rows alike: the experiment's quality
    sampler is ancestral (respaced or ddpm)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=table2_ablation"])
    assert cfg.callbacks.quality.sampler.name in ("respaced", "ddpm")


@pytest.mark.slow
def test_table2_sweep_through_train_py_finishes_all_eight_jobs(tmp_path):
    """`train.py -m experiment=table2_ablation`, one step a job and a 5-step respaced quality sampler (debug=fast
    alone would score with DDIM): 8 job folders, each status.json finished with its scores; with L_simple the
    fixed-Σ and the learned-Σ jobs (Σ = sqrt(β β̃) there) score differently."""
    import json

    done = run_train("-m", "experiment=table2_ablation", *QUIET, "trainer.max_steps=1",
                     "trainer.val_check_interval=100000", "callbacks.quality.at_train_end=true",
                     "callbacks.quality.num_samples=8", "callbacks.quality.max_reference_images=32",
                     "callbacks.quality.sampler.name=respaced", "callbacks.quality.sampler.steps=5",
                     "hydra.sweep.subdir=${hydra.job.num}", cwd=tmp_path, timeout=900)  # short names
    assert done.returncode == 0, done.stderr[-3000:]
    [sweep] = tmp_path.glob("multirun/table2_ablation/*")
    jobs = sorted(sweep.glob("[0-9]*"), key=lambda p: int(p.name.split("_")[0]))
    assert len(jobs) == 8
    status = {}
    for job in jobs:
        s = json.loads((job / "status.json").read_text())
        assert s["status"] == "finished" and s["step"] == 1, (job.name, s["error"])
        sampler = s["quality_protocol"]["sampler"]
        assert (sampler["name"], sampler["steps"]) == ("respaced", 5), sampler
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        status[(cfg["objective"]["parameterization"], cfg["objective"]["variance"], cfg["objective"]["loss"])] = s
    assert len(status) == 8
    printed = [line for line in done.stdout.splitlines() if line.startswith("quality: ")]
    assert len(printed) == 8
    # After one step the μ̃ nets still output about 0, whose x̂0 clips to ±1 wherever Σ is: only ε shows Σ here.
    fixed, learned = (status[("eps", v, "simple")]["quality"] for v in ("fixed_large", "learned_range"))
    assert fixed["val/fid"] != learned["val/fid"]
