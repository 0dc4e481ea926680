"""One training run per run directory: the lock itself with real processes (live, dead, reused pids, other
hosts, SLURM requeues, DDP ranks), then through train.py: a second live run refused, a stale lock replaced,
a requeued SLURM job resuming past another node's lock, and a directory holding another model's checkpoint.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion.errors import UserError
from diffusion.run.commands.train import train
from diffusion.run.jobs import lock as run_lock
from helpers import ROOT, run_script, train_cfg

# (what the user did, a fragment of the one line it gets): collected for docs/bad_inputs.md
BAD_INPUT_CASES = [
    ("train.py into the hydra.run.dir of a run that is still going",
     "is in use by another training run (pid "),
    ("train.py into a hydra.run.dir that holds a checkpoint of another model (model.ch=16 there)",
     "holds a checkpoint of another model (trained with net.ch=16, this run has net.ch=32): use another "
     "hydra.run.dir, or remove "),
]
LOCK = run_lock.LOCK_NAME


@pytest.fixture
def sleeper():
    """A live process of this host (not this one): the holder of a 'live' lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is gone
    return proc.pid


def write_lock(run_dir: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock as another process would have left it, last refreshed `age_s` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": 1, "host": socket.gethostname(), "pid_start": None, "started": "2026-01-01T00:00:00+00:00",
              "slurm_job_id": None, "token": "theirs", **fields}
    path = run_dir / LOCK
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def proc_start(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.fixture(autouse=True)
def not_distributed(monkeypatch):
    for key in (*run_lock.RANK_VARIABLES, "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(key, raising=False)


# --- the lock ------------------------------------------------------------------------------------------------
def test_lock_holds_pid_host_and_start_and_is_released(tmp_path):
    run_dir = tmp_path / "run"
    path = run_lock.acquire(run_dir)
    record = json.loads(path.read_text())
    assert path == run_dir / LOCK and record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["pid_start"] == proc_start(os.getpid()) and record["started"][:4].isdigit()
    assert run_lock.acquire(run_dir) == path and json.loads(path.read_text()) == record  # held: kept as is
    assert [p.name for p in run_dir.iterdir()] == [LOCK]  # nothing else written there
    run_lock.release(run_dir)
    assert not path.exists()
    with run_lock.hold(run_dir):
        assert path.exists()
    assert not path.exists()


def test_a_live_lock_on_this_host_is_refused_in_one_line(sleeper, tmp_path):
    path = write_lock(tmp_path, pid=sleeper.pid, pid_start=proc_start(sleeper.pid), age_s=3600)  # age: irrelevant
    before = path.read_text()
    with pytest.raises(UserError) as err:
        run_lock.acquire(tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"(pid {sleeper.pid} on {socket.gethostname()}, started 2026-01-01" in message
    assert "use another hydra.run.dir, or wait until that run ends" in message
    assert path.read_text() == before


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "zombie"])
def test_a_lock_whose_process_is_gone_is_replaced(holder, sleeper, tmp_path, capsys):
    if holder == "dead pid":
        write_lock(tmp_path, pid=dead_pid())
    elif holder == "reused pid":  # the pid now runs another process than the one that wrote the lock
        write_lock(tmp_path, pid=sleeper.pid, pid_start=str(int(proc_start(sleeper.pid)) - 100))
    else:
        zombie = subprocess.Popen([sys.executable, "-c", "pass"])
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.05)  # exited, not yet reaped
        write_lock(tmp_path, pid=zombie.pid)
    path = run_lock.acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "note: replacing the lock of pid" in capsys.readouterr().err
    run_lock.release(tmp_path)
    if holder == "zombie":
        zombie.wait()


@pytest.mark.parametrize("age_s, slurm, taken", [(60, None, False), (run_lock.STALE_AFTER_S + 60, None, True),
                                                  (60, "777", True), (60, "778", False)])
def test_a_lock_from_another_host_is_trusted_while_fresh_unless_it_is_this_slurm_job(age_s, slurm, taken, tmp_path,
                                                                                      monkeypatch):
    write_lock(tmp_path, host="node-a", pid=os.getpid(), age_s=age_s, slurm_job_id="777")
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", slurm)
    if taken:
        assert json.loads(run_lock.acquire(tmp_path).read_text())["host"] == socket.gethostname()
        run_lock.release(tmp_path)
        return
    with pytest.raises(UserError, match="on node-a, started .*; use another hydra.run.dir.*if that run is gone, "
                                        f"delete {tmp_path / LOCK}"):
        run_lock.acquire(tmp_path)


def test_an_unreadable_lock_is_judged_by_its_age(tmp_path):
    (tmp_path / LOCK).write_text("{not json")
    with pytest.raises(UserError, match=r"pid \? on \?"):
        run_lock.acquire(tmp_path)
    os.utime(tmp_path / LOCK, (0, 0))
    run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)


@pytest.mark.parametrize("variable, value, takes", [("LOCAL_RANK", "1", False), ("RANK", "3", False),
                                                    ("SLURM_PROCID", "1", False), ("NODE_RANK", "1", False),
                                                    ("LOCAL_RANK", "0", True), ("SLURM_PROCID", "0", True)])
def test_only_global_rank_zero_takes_the_lock(variable, value, takes, tmp_path, monkeypatch):
    monkeypatch.setenv(variable, value)
    assert (run_lock.acquire(tmp_path) is not None) == takes
    assert (tmp_path / LOCK).exists() == takes
    run_lock.release(tmp_path)


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    path = run_lock.acquire(tmp_path)
    path.unlink()
    write_lock(tmp_path, pid=dead_pid(), token="someone else's")
    run_lock.release(tmp_path)
    assert json.loads(path.read_text())["token"] == "someone else's"


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    path = run_lock.acquire(tmp_path)
    child = os.fork()
    if child == 0:  # a data-loader worker, say: it inherits the record of the lock
        run_lock.release(tmp_path)
        os._exit(0)
    os.waitpid(child, 0)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    run_lock.release(tmp_path)
    assert not path.exists()


def test_removing_a_stale_lock_puts_back_one_taken_meanwhile(tmp_path):
    path = write_lock(tmp_path, token="new")
    run_lock._remove_stale(path, seen='{"token": "old"}')  # what the starter read before another took it
    assert json.loads(path.read_text())["token"] == "new" and [p.name for p in tmp_path.iterdir()] == [LOCK]


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    path = run_lock.acquire(tmp_path)
    os.utime(path, (0, 0))
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.01)
    run_lock.refresh_held()
    assert time.time() - path.stat().st_mtime < 60 and run_lock._heartbeat[0].is_alive()
    run_lock.release(tmp_path)


# --- through train.py ----------------------------------------------------------------------------------------
LONG_RUN = ["debug=fast", "logger=none", "trainer.max_steps=100000", "callbacks.samples=null",
            "callbacks.checkpoint.every_n_train_steps=1000", "trainer.val_check_interval=100000"]


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
def test_a_second_train_py_into_a_live_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_RUN, f"hydra.run.dir={run_dir}"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".hydra" / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert json.loads((run_dir / LOCK).read_text())["pid"] == first.pid
        config = (run_dir / ".hydra" / "config.yaml").read_text()
        second = run_script("train.py", "debug=fast", "logger=none", "schedule=cosine", f"hydra.run.dir={run_dir}",
                            cwd=tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        line = last_line(second)
        assert line.startswith(f"error: run directory {run_dir} {BAD_INPUT_CASES[0][1]}{first.pid} on ")
        assert "use another hydra.run.dir, or wait until that run ends" in line
        assert (run_dir / ".hydra" / "config.yaml").read_text() == config  # the first run's record is intact
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)


@pytest.mark.slow
def test_a_stale_lock_is_replaced_and_a_directory_of_another_model_is_refused(tmp_path):
    """A lock left by a dead process: the run goes on (and releases it). Then a run of another model into that
    directory, which would resume its last.ckpt by itself, is told to use another directory."""
    run_dir = tmp_path / "run"
    write_lock(run_dir, pid=dead_pid())
    first = run_script("train.py", "debug=fast", "logger=none", "callbacks.samples=null", "model.ch=16",
                       "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "note: replacing the lock of pid " in first.stderr and "is no longer running" in first.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (run_dir / LOCK).exists()
    other = run_script("train.py", "debug=fast", "logger=none", "callbacks.samples=null", f"hydra.run.dir={run_dir}",
                       cwd=tmp_path)
    assert other.returncode == 2, other.stderr[-3000:]
    line = last_line(other)
    assert line == (f"error: run directory {run_dir} {BAD_INPUT_CASES[1][1]}{run_dir / 'checkpoints'} (that model's "
                    "checkpoints) to train this one there"), line
    assert not (run_dir / LOCK).exists()  # released on the error too


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_past_the_lock_its_first_node_left(tmp_path):
    """The job's first run (in this process, for speed) leaves last.ckpt; its node dies with the lock held
    (written here); the requeued job, same id, so same directory, runs train.py on another node and resumes."""
    run_dir = tmp_path / "outputs" / "requeue" / "slurm-4343"
    train(train_cfg(run_dir, "logger=none", "callbacks.samples=null", "name=requeue", "trainer.max_steps=2"))
    write_lock(run_dir, host="node-that-died", pid=12345, slurm_job_id="4343")  # fresh, from another host
    env = {**os.environ, "SLURM_JOB_ID": "4343", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}
    requeued = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", "logger=none",
                               "callbacks.samples=null", "name=requeue", "trainer.max_steps=4"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "(SLURM job 4343 was requeued)" in requeued.stderr
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in requeued.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (run_dir / LOCK).exists()
