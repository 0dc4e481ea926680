"""Outputs written whole or not at all, and faults that end in one line: every entry point driven into a failed
write by a real limit (RLIMIT_FSIZE, a read-only folder, a path under a file), stopped by Ctrl-C or SIGTERM, or
given a damaged job folder. Each through the real scripts, as a user runs them."""

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, run_script, save_digits_pipeline

BAD_INPUT_CASES = [  # (what, the part of the one line the tests check) for docs/bad_inputs.md
    ("sample.py, samples.npz over the file-size limit (ulimit -f)", "cannot write"),
]


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sample_stopped_while_it_imports_is_one_line(pipeline, tmp_path, sig):
    run = tmp_path / "h"
    proc = start("sample.py", f"ckpt={pipeline}", f"hydra.run.dir={run}", cwd=tmp_path)
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
