"""Outputs written whole or not at all, and faults that end in one line: every entry point driven into a failed
write by a real limit (RLIMIT_FSIZE, a read-only folder, a path under a file), stopped by Ctrl-C or SIGTERM, or
given a damaged job folder. Each through the real scripts, as a user runs them."""

import csv
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, run_script, save_digits_pipeline

BAD_INPUT_CASES = [  # (what, the part of the one line the tests check) for docs/bad_inputs.md
    ("sample.py, samples.npz over the file-size limit (ulimit -f)", "cannot write"),
    ("sample.py stopped by Ctrl-C or SIGTERM while importing or sampling", "error: stopped by SIG"),
    ("train.py, evaluate.py, figures.py, export.py, report.py stopped while importing", "error: stopped by SIG"),
    ("evaluate.py or figures.py, output_dir under a file", "is a file, not a folder"),
    ("train.py, a checkpoint over the file-size limit (ulimit -f)", "File too large"),
    ("export.py, the weights over the file-size limit (ulimit -f)", "cannot write"),
    ("export.py out= a file", "already exists and is not an empty folder"),
    ("export.py out= under a file", "is a file, not a folder"),
    ("report.py, a job folder with a cut-off .hydra/config.yaml or an unreadable file", "damaged job folder"),
    ("report.py --out a file or under a file", "--out="),
    ("report.py, the report over the file-size limit (ulimit -f)", "cannot write"),
    ("evaluate.py guidance_table= on an unconditional checkpoint", "leave out guidance_table"),
    ("sample.py or export.py given a truncated checkpoint", "another checkpoint of that run"),
]
FAST = ["debug=fast", "logger=none", "callbacks.samples=null"]


def file_size_limit(limit: int):
    """preexec_fn: the child may write no file longer than `limit` bytes (a write past it fails with EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files a writer left behind."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name)


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: nothing can be created under it, whoever runs the test (root included)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny real run through train.py (digits, T=20, 4 steps)."""
    out = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *FAST, f"hydra.run.dir={out}", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_digits_pipeline(tmp_path_factory.mktemp("pipe") / "pipe")


def test_sample_over_the_file_size_limit_is_one_line_and_leaves_no_samples_npz(pipeline, tmp_path):
    out = tmp_path / "out"
    result = run_script("sample.py", f"ckpt={pipeline}", "num_samples=16", "sampler.name=ddim", "sampler.steps=2",
                        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h'}", "hydra.output_subdir=null",
                        cwd=tmp_path, preexec_fn=file_size_limit(600))
    line = one_line(result)
    assert f"cannot write {out / 'samples.npz'} (File too large)" in line and "ulimit -f" in line
    assert not (out / "samples.npz").exists() and leftovers(out) == []


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ended_by(proc: subprocess.Popen, sig: signal.Signals) -> str:
    """Send `sig`; the process ends with 128 + sig and one line on stderr, which is returned."""
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig and len(lines) == 1, (proc.returncode, stderr[-3000:])
    assert lines[0].startswith(f"error: stopped by {sig.name}"), lines
    return lines[0]


@pytest.mark.parametrize("script, sig", [("sample.py", signal.SIGINT), ("sample.py", signal.SIGTERM),
                                         ("train.py", signal.SIGINT), ("evaluate.py", signal.SIGTERM),
                                         ("figures.py", signal.SIGINT), ("export.py", signal.SIGTERM),
                                         ("report.py", signal.SIGINT)])
def test_an_entry_point_stopped_while_it_imports_is_one_line(pipeline, tmp_path, script, sig):
    run = tmp_path / "h"
    args = [str(tmp_path)] if script == "report.py" else \
        [*FAST] if script == "train.py" else [f"ckpt={pipeline}", f"out={tmp_path / 'model'}"] \
        if script == "export.py" else [f"ckpt={pipeline}"]
    hydra = [] if script == "report.py" else [f"hydra.run.dir={run}"]
    proc = start(script, *args, *hydra, cwd=tmp_path)
    time.sleep(1.0)  # Python is up; torch, Lightning and Hydra take seconds more to import
    ended_by(proc, sig)
    assert not run.exists()  # stopped before the job began: during the imports or the command line's check


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sample_stopped_while_it_samples_is_one_line_and_leaves_no_samples(pipeline, tmp_path, sig):
    run, out = tmp_path / "h", tmp_path / "out"
    proc = start("sample.py", f"ckpt={pipeline}", "num_samples=100000", f"output_dir={out}",
                 f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (run / "status.json").exists() and time.monotonic() < deadline:  # the job has begun
        time.sleep(0.2)
    time.sleep(2.0)  # loading a 20-step model takes well under this; 100,000 samples take minutes
    line = ended_by(proc, sig)
    assert "no file was left half-written" in line
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    assert not (out / "samples.npz").exists() and not (out / "samples.png").exists() and leftovers(out) == []


@pytest.mark.parametrize("script", ["evaluate.py", "figures.py"])
def test_an_output_dir_under_a_file_is_one_line_before_the_work(pipeline, a_file, tmp_path, script):
    line = one_line(run_script(script, f"ckpt={pipeline}", "logger=none", f"output_dir={a_file}/out",
                               f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path))
    assert f"output_dir={a_file}/out cannot be written ({a_file} is a file, not a folder)" in line


@pytest.mark.slow
def test_train_over_the_file_size_limit_is_one_line_and_leaves_no_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_script("train.py", *FAST, f"hydra.run.dir={run}", "hydra.output_subdir=null", cwd=tmp_path,
                        preexec_fn=file_size_limit(1_000_000))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # beside Lightning's notes
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cannot write {run}/" in errors[0] and "(File too large)" in errors[0] and "ulimit -f" in errors[0]
    assert not list(run.rglob("*.ckpt")) and leftovers(run) == []


# --- export.py ------------------------------------------------------------------------------------------------
def export_script(trained: Path, out: Path, tmp_path: Path, **kwargs):
    return run_script("export.py", f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                      f"hydra.run.dir={tmp_path / 'h'}", "hydra.output_subdir=null", cwd=tmp_path, **kwargs)


@pytest.mark.slow
def test_export_over_the_file_size_limit_is_one_line_and_leaves_no_folder(trained, tmp_path):
    out = tmp_path / "model"
    line = one_line(export_script(trained, out, tmp_path, preexec_fn=file_size_limit(100_000)))
    assert f"cannot write {out} (File too large)" in line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_export_to_a_file_or_under_a_file_is_one_line(trained, a_file, tmp_path):
    assert f"out={a_file} already exists and is not an empty folder" in one_line(export_script(trained, a_file,
                                                                                               tmp_path))
    line = one_line(export_script(trained, a_file / "model", tmp_path))
    assert f"cannot write {a_file / 'model'}: {a_file} is a file, not a folder" in line
    assert a_file.read_text() == "not a folder" and leftovers(tmp_path) == []


# --- report.py ------------------------------------------------------------------------------------------------
def sweep_of(trained: Path, folder: Path, jobs: int) -> Path:
    """A sweep folder of `jobs` copies of the trained run's job files (config, overrides, status)."""
    for i in range(jobs):
        job = folder / f"{i}_seed={i}"
        shutil.copytree(trained / ".hydra", job / ".hydra")
        shutil.copy(trained / "status.json", job / "status.json")
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={i}\n")
    return folder


def report_rows(folder: Path) -> list[dict]:
    with open(folder / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_marks_a_damaged_job_unknown_with_the_reason(trained, tmp_path):
    sweep = sweep_of(trained, tmp_path / "sweep", 3)
    config = sweep / "1_seed=1" / ".hydra" / "config.yaml"
    config.write_text(config.read_text()[:200] + "\n  name: 'cut off her")  # a copy stopped mid-string
    (sweep / "2_seed=2" / "loss_by_t.csv").write_bytes(b"step,t0\n\xff\xfe\x00")  # not text at all
    result = run_script("report.py", str(sweep), "--no-wandb", cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = {row["job"]: row for row in report_rows(sweep)}
    assert rows["0_seed=0"]["status"] == "finished"
    assert rows["1_seed=1"]["status"] == "unknown" and rows["2_seed=2"]["status"] == "unknown"
    assert rows["1_seed=1"]["note"].startswith("damaged job folder: .hydra/config.yaml cannot be read (")
    assert rows["2_seed=2"]["note"].startswith("damaged job folder: loss_by_t.csv cannot be read (")
    assert "3 jobs: 1 finished, 2 unknown" in result.stdout


@pytest.mark.slow
def test_report_out_that_is_a_file_or_under_a_file_is_one_line(trained, a_file, tmp_path):
    sweep = sweep_of(trained, tmp_path / "sweep", 1)
    for out in (a_file, a_file / "reports"):
        line = one_line(run_script("report.py", str(sweep), "--out", str(out), "--no-wandb", cwd=tmp_path))
        assert f"--out={out} cannot be written ({a_file} is a file, not a folder)" in line


@pytest.mark.slow
def test_report_over_the_file_size_limit_is_one_line_and_leaves_no_report(trained, tmp_path):
    sweep = sweep_of(trained, tmp_path / "sweep", 2)
    line = one_line(run_script("report.py", str(sweep), "--no-wandb", cwd=tmp_path, preexec_fn=file_size_limit(300)))
    assert f"cannot write {sweep}/" in line and "(File too large)" in line
    assert not list(sweep.glob("report*")) and leftovers(sweep) == []


# --- messages that point the right way ------------------------------------------------------------------------
def test_a_guidance_table_on_an_unconditional_checkpoint_names_the_key_given(pipeline, tmp_path):
    line = one_line(run_script("evaluate.py", f"ckpt={pipeline}", "guidance_table=[0,2]", "logger=none",
                               f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path))
    assert "guidance_table=[0.0, 2.0]" in line and "leave out guidance_table" in line, line
    assert "guidance_table." not in line


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sample.py", "export.py"])
def test_a_truncated_checkpoint_given_to_read_names_another_checkpoint_not_a_resume(trained, tmp_path, script):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = shutil.copy(trained / "checkpoints" / "step0000002.ckpt", folder / "step0000002.ckpt")
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut off half-way
    target = f"out={tmp_path / 'model'}" if script == "export.py" else f"output_dir={tmp_path / 'out'}"
    line = one_line(run_script(script, f"ckpt={folder / 'last.ckpt'}", target, f"hydra.run.dir={tmp_path / 'h'}",
                               cwd=tmp_path))
    assert "is truncated or corrupt" in line and f"give ckpt= another checkpoint of that run, e.g. ckpt={good}" in line
    assert "ckpt_path" not in line and "resume" not in line
