"""DDP with 2 CPU processes (gloo) through the real train.py: same training as one process, one run per job."""

import pytest
import torch

from helpers import run_script, wandb_history, wandb_records

pytestmark = [pytest.mark.ddp, pytest.mark.slow]
TINY = ["debug=fast", "callbacks.samples=null", "trainer.max_steps=4"]


def _history(run_dir, key):
    return {int(r["trainer/global_step"]): r[key] for r in wandb_history(run_dir) if key in r}


def test_two_processes_train_exactly_as_one_with_the_global_batch(tmp_path):
    # 2 ranks × 16 images against 1 process × 32: the same images and the same (t, ε) per image each step.
    single = run_script("train.py", *TINY, "trainer=cpu", "data.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}",
                        cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script("train.py", *TINY, "trainer=ddp_cpu", "data.batch_size=16", f"hydra.run.dir={tmp_path / 'two'}",
                     cwd=tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "16 per device × 2 devices × 1 accumulated = 32 images" in ddp.stdout + ddp.stderr

    one, two = _history(tmp_path / "one", "train/loss"), _history(tmp_path / "two", "train/loss")
    assert sorted(one) == sorted(two) and len(one) == 4
    torch.testing.assert_close(torch.tensor([two[s] for s in sorted(two)]), torch.tensor([one[s] for s in sorted(one)]),
                               rtol=1e-5, atol=1e-6)
    state_one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    state_two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    for key, value in state_one["current_model_state"].items():  # the raw weights after 4 Adam steps
        torch.testing.assert_close(state_two["current_model_state"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    # Both ranks hold the same weights (checked with gathered checksums), and rank 1 made no run of its own.
    assert list(_history(tmp_path / "two", "ddp/ranks_in_sync").values())[-1] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1


def test_multirun_with_ddp_runs_each_job_once_in_its_own_directory(tmp_path):
    result = run_script("train.py", "-m", "schedule=linear,cosine", "schedule.num_timesteps=20,30", "trainer=ddp_cpu",
                        *TINY[:2], "trainer.max_steps=2", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "multirun" / "default").iterdir())
    assert len(sweeps) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2", "3"]
    groups, configs = set(), set()
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, job  # one W&B run per job: no rank re-ran the sweep
        run = next(r["run"] for r in wandb_records(job) if r.get("type") == "run")
        groups.add(run["run_group"])
        configs.add(tuple(t for t in run["tags"] if t.startswith("schedule")))
        assert sorted(_history(job, "train/loss")) == [0, 1]  # trainer.max_steps=2
    assert len(groups) == 1 and groups.pop().startswith("default-")
    assert len(configs) == 4  # each job its own (schedule, T), as tags for the dashboard


def test_two_processes_train_a_class_conditional_model_as_one(tmp_path):
    # Labels follow their images onto the ranks, and each rank drops the labels of its rows of the global draw.
    cond = ["model.num_classes=10", "training.cond_drop_prob=0.5", "validation.bpd_images=0"]
    single = run_script("train.py", *TINY, *cond, "trainer=cpu", "data.batch_size=32",
                        f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script("train.py", *TINY, *cond, "trainer=ddp_cpu", "data.batch_size=16",
                     f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _history(tmp_path / "one", "train/loss"), _history(tmp_path / "two", "train/loss")
    assert sorted(one) == sorted(two) and len(one) == 4
    torch.testing.assert_close(torch.tensor([two[s] for s in sorted(two)]), torch.tensor([one[s] for s in sorted(one)]),
                               rtol=1e-5, atol=1e-6)
    state_one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    state_two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state_two["hyper_parameters"]["class_names"] == [str(k) for k in range(10)]
    weights = "current_model_state"
    torch.testing.assert_close(state_two[weights]["net.label_emb.weight"], state_one[weights]["net.label_emb.weight"],
                               rtol=1e-4, atol=1e-5)
