"""Preflight: folders that cannot be written, W&B online without a key or a server, devices that are not there,
and a sweep that goes on past a failed job. Each through the real scripts, as a user runs them: one line, exit
status 2, before any step or image (nothing written that a later failure would lose)."""

import json
import socket
import time
from pathlib import Path

import pytest

from helpers import run_script, save_digits_pipeline

FAST = ["debug=fast", "logger=none", "callbacks.samples=null"]

BAD_INPUT_CASES = [  # (what, the part of the one line the tests check) for docs/bad_inputs.md
    ("train.py, the run directory under a file", "hydra.run.dir="),
    ("train.py, callbacks.checkpoint.dirpath under a file", "callbacks.checkpoint.dirpath="),
    ("train.py, the digits CNN's cache folder under a file", "cache_dir"),
    ("sample.py, output_dir under a file", "output_dir="),
    ("train.py logger.offline=false without a W&B key", "no W&B API key"),
    ("train.py logger.offline=false, the W&B server unreachable", "warning: W&B server"),
    ("sample.py device=cuda:3 on a machine without it", "device=cuda:3 but this machine has"),
    ("train.py trainer.accelerator=gpu without a GPU", "no CUDA GPU is visible"),
    ("train.py -m, one job failing at run time", "job(s) of the sweep failed"),
]


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: nothing can be created under it, whoever runs the test (root included)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_run_directory_that_cannot_be_created(a_file, tmp_path):
    line = one_line(run_script("train.py", *FAST, f"hydra.run.dir={a_file}/run", cwd=tmp_path))
    assert f"hydra.run.dir={a_file}/run cannot be created" in line and "writable" in line


def test_a_checkpoint_folder_that_cannot_be_written_is_found_before_the_first_step(a_file, tmp_path):
    run = tmp_path / "run"
    line = one_line(run_script("train.py", *FAST, f"hydra.run.dir={run}", f"callbacks.checkpoint.dirpath={a_file}/ck",
                               cwd=tmp_path))
    assert f"callbacks.checkpoint.dirpath={a_file}/ck cannot be written" in line
    assert not list(run.rglob("*.ckpt"))


def test_the_feature_extractors_cache_that_cannot_be_written_is_found_before_training(a_file, tmp_path):
    run = tmp_path / "run"
    line = one_line(run_script("train.py", "debug=fast", "logger=none", f"hydra.run.dir={run}",
                               "callbacks.quality.at_train_end=true",
                               f"callbacks.quality.feature_extractor.cache_dir={a_file}/cache", cwd=tmp_path,
                               env={"XDG_CACHE_HOME": str(tmp_path / "xdg")}))
    assert f"{a_file}/cache" in line and "cache_dir" in line
    assert not list(run.rglob("*.ckpt"))  # refused before the first step, not after training


def test_sample_output_that_cannot_be_written_is_found_before_the_first_image(a_file, tmp_path):
    folder = save_digits_pipeline(tmp_path / "pipe")
    line = one_line(run_script("sample.py", f"ckpt={folder}", "num_samples=4", f"output_dir={a_file}/out",
                               f"hydra.run.dir={tmp_path}/h", cwd=tmp_path))
    assert f"output_dir={a_file}/out cannot be written" in line


def test_wandb_online_without_a_key_is_one_line(tmp_path):
    run = tmp_path / "run"
    line = one_line(run_script("train.py", "debug=fast", "callbacks.samples=null", "logger.offline=false",
                               f"hydra.run.dir={run}", cwd=tmp_path,
                               env={"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": str(tmp_path / "none")}))
    assert "no W&B API key" in line and "logger.offline=true" in line
    assert not list(run.rglob("*.ckpt"))


def test_wandb_online_with_an_unreachable_server_falls_back_to_offline_in_one_warning(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    began = time.monotonic()
    result = run_script("train.py", "debug=fast", "callbacks.samples=null", "logger.offline=false",
                        f"hydra.run.dir={run}", "trainer.max_steps=2", cwd=tmp_path,
                        env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"})
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in (result.stdout + result.stderr).splitlines() if "W&B server" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "logging offline" in warnings[0]
    assert list(run.glob("wandb/offline-run-*"))  # the run logged offline, to be synced later
    assert time.monotonic() - began < 120


def test_devices_that_are_not_there(tmp_path):
    folder = save_digits_pipeline(tmp_path / "pipe")
    line = one_line(run_script("sample.py", f"ckpt={folder}", "num_samples=4", "device=cuda:3",
                               f"hydra.run.dir={tmp_path}/h", cwd=tmp_path))
    assert "device=cuda:3 but this machine has 0 CUDA device(s)" in line and "device=cpu" in line
    line = one_line(run_script("train.py", *FAST, "trainer.accelerator=gpu", f"hydra.run.dir={tmp_path}/r",
                               cwd=tmp_path))
    assert "trainer.accelerator=gpu" in line and "trainer=cpu" in line


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_failed_job_and_ends_non_zero(tmp_path):
    """data=mnist finds no files under ./data at run time (the composition is valid): that job fails in one
    line, the digits job trains, and the sweep ends with the summary and exit status 1."""
    sweep = tmp_path / "sweep"
    result = run_script("train.py", "-m", *FAST, "trainer.max_steps=2", "data=mnist,digits",
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    err = [line for line in result.stderr.splitlines() if line.strip()]
    [failed] = [line for line in err if line.startswith("error: job 0 (")]
    assert "data=mnist" in failed and "failed: MNIST not found under" in failed
    assert err[-2] == "error: 1 job(s) of the sweep failed:" and err[-1].startswith("  0_") and "MNIST" in err[-1]
    assert "Traceback" not in result.stderr
    statuses = {p.parent.name.split("_")[0]: json.loads(p.read_text())["status"] for p in sweep.glob("*/status.json")}
    assert statuses == {"0": "failed", "1": "finished"}
    assert next(sweep.glob("1_*")).joinpath("checkpoints", "last.ckpt").is_file()
