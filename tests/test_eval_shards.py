"""Images seeded per image, and an evaluation that keeps its features in shards: resumed after a kill, or merged
from the parts of a SLURM array, it scores exactly as the one-shot evaluation does."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion.errors import UserError
from diffusion.metrics.shards import FeatureShards
from diffusion.run.commands.train import train
from helpers import ROOT, run_script, train_cfg

EVAL = ["num_samples=24", "batch_size=8", "sampler.name=ddim", "sampler.steps=3", "sampler.eta=1",
        "max_reference_images=64", "bpd.enabled=false", "logger=none", "progress_bar=false", "accelerator=cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    train(train_cfg(out, "logger=none", "callbacks.samples=null"))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def one_shot(ckpt, tmp_path_factory):
    """The plain evaluation, no shards: the score every sharded one must equal."""
    out = tmp_path_factory.mktemp("one_shot")
    result = run_script("evaluate.py", f"ckpt={ckpt}", *EVAL, f"hydra.run.dir={out}", cwd=out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def evaluate(ckpt, out, *args, timeout=600):
    out.mkdir(parents=True, exist_ok=True)
    return run_script("evaluate.py", f"ckpt={ckpt}", *EVAL, f"hydra.run.dir={out}", *args, cwd=out, timeout=timeout)


def shard_files(root):
    return sorted(root.glob("*/chunk-*.pt"))


def test_an_evaluation_resumes_from_the_shards_it_has_and_scores_as_one_shot(ckpt, one_shot, tmp_path):
    shards = tmp_path / "shards"
    first = evaluate(ckpt, tmp_path / "first", f"shards.dir={shards}", "shards.images=true")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "(0 of the 24 images asked for are there, 24 to draw)" in first.stdout
    files = shard_files(shards)
    assert len(files) == 3  # one per chunk of 8
    part = torch.load(files[0], weights_only=True)
    assert part["gen_index"].tolist() == list(range(8)) and part["images"].dtype == torch.uint8
    assert json.loads((tmp_path / "first" / "report.json").read_text())["quality"] == one_shot["quality"]

    files[1].unlink()  # a preempted run: the middle chunk never written
    again = evaluate(ckpt, tmp_path / "again", f"shards.dir={shards}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(16 of the 24 images asked for are there, 8 to draw)" in again.stdout
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["quality"] == one_shot["quality"] and report["protocol_id"] == one_shot["protocol_id"]
    assert len(shard_files(shards)) == 3


def test_a_killed_evaluation_says_what_it_kept_and_the_same_command_finishes_it(ckpt, tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "killed"
    out.mkdir()
    args = ["num_samples=24", "batch_size=1"]  # 24 chunks: the signal lands while it draws
    plain = evaluate(ckpt, tmp_path / "plain", *args)  # one shot, no shards, the same batches
    assert plain.returncode == 0, plain.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), f"ckpt={ckpt}", *EVAL, *args,
                             f"hydra.run.dir={out}", f"shards.dir={shards}"], cwd=out, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not shard_files(shards) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    kept = len(shard_files(shards))
    assert 0 < kept < 24
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM; the report") and f"{kept} chunks' features are in {shards}, " \
        "the same command resumes from them" in last
    for path in shard_files(shards):  # every shard is whole
        torch.load(path, weights_only=True)
    again = evaluate(ckpt, out, *args, f"shards.dir={shards}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({kept} of the 24 images asked for are there, {24 - kept} to draw)" in again.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["quality"] == json.loads((tmp_path / "plain" / "report.json").read_text())["quality"]


def test_slurms_time_limit_signal_requeues_an_evaluation_that_resumes_from_its_shards(ckpt, tmp_path):
    """Under SLURM the shards go to the job's folder (named by the job id, the same after a requeue); SIGUSR2 stops
    the evaluation, `scontrol requeue <job>` (a fake that records its call), exit 140; the requeued job resumes."""
    calls, bin_dir = tmp_path / "scontrol_calls", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "6161", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "evaluate",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    shards = tmp_path / "outputs" / "evaluate" / "slurm-6161" / "shards"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt={ckpt}", *EVAL, "batch_size=1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not shard_files(shards) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGUSR2; the report") and last.endswith(
        f"requeued SLURM job 6161 (scontrol requeue), it resumes from the feature shards in {shards}"), last
    assert calls.read_text().split() == ["requeue", "6161"]
    kept = len(shard_files(shards))
    requeued = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"({kept} of the 24 images asked for are there, {24 - kept} to draw)" in requeued.stdout
    assert (shards.parent / "report.json").is_file()


def test_the_parts_of_an_array_over_seed_ranges_merge_into_the_one_shot_score(ckpt, one_shot, tmp_path):
    shards = tmp_path / "shards"
    for i, (seeds, more) in enumerate([("0-7", []), ("8-23", ["devices=2"])]):
        part = evaluate(ckpt, tmp_path / f"part{i}", f"seeds={seeds}", f"shards.dir={shards}", *more)
        assert part.returncode == 0, part.stderr[-3000:]
        assert not (tmp_path / f"part{i}" / "report.json").exists()  # a part has no score
    merged = evaluate(ckpt, tmp_path / "merged", f"shards.dir={shards}")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "(24 of the 24 images asked for are there, 0 to draw)" in merged.stdout
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert report["quality"] == one_shot["quality"] and report["protocol_id"] == one_shot["protocol_id"]


def test_a_part_says_how_many_images_the_shards_hold(ckpt, tmp_path):
    shards = tmp_path / "shards"
    part = evaluate(ckpt, tmp_path / "part", "seeds=8-15", f"shards.dir={shards}")
    assert part.returncode == 0, part.stderr[-3000:]
    assert "holds the features of 8 of the 24 images; the score needs all of them" in part.stdout
    assert [torch.load(p, weights_only=True)["gen_index"].tolist() for p in shard_files(shards)] == \
        [list(range(8, 16))]


@pytest.mark.parametrize("args, message", [
    (["seeds=0-7"], "error: seeds=0-7 draws 8 of the num_samples=24 images: their features go into shards, give "
     "shards.dir=DIR"),
    (["seeds=0-7", "shards.dir=S", "bpd.enabled=true"], "error: seeds=0-7 draws 8 of the num_samples=24 images (a "
     "part, into shards): bpd.enabled would be computed by every part; set bpd.enabled=false here"),
    (["seeds=20-30", "shards.dir=S"], "error: seeds asks for images 20..30 of num_samples=24 (numbered 0..23); raise "
     "num_samples to 31"),
    (["seeds=7-3"], "error: seeds must be null or image numbers >= 0 like 0-49999 or 0-9,20,30-39 (ranges "
     "inclusive), got 7-3"),
])
def test_seed_mistakes_are_one_line(ckpt, tmp_path, args, message):
    result = evaluate(ckpt, tmp_path, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr


def test_another_draw_in_the_same_folder_is_refused(tmp_path):
    shards = FeatureShards(tmp_path, {"seed": 0})
    shards.prepare()
    (shards.dir / "manifest.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(UserError, match="describes another draw than this one"):
        FeatureShards(tmp_path, {"seed": 0}).prepare()


def test_an_image_in_two_shards_counts_once(tmp_path):
    shards = FeatureShards(tmp_path, {"seed": 0})
    shards.prepare()
    shards.save(0, {"gen_index": torch.tensor([0, 1, 2]), "gen_features": torch.ones(3, 2)})
    shards.save(0, {"gen_index": torch.tensor([2, 3]), "gen_features": torch.zeros(2, 2)})
    loaded = shards.load()
    assert loaded.index.tolist() == [0, 1, 2, 3]
    assert sum(len(p["gen_index"]) for p in loaded.parts) == 4


def test_sample_py_draws_the_same_image_for_a_seed_whatever_the_batch_or_the_others(ckpt, tmp_path):
    runs = {}
    for name, args in [("all", ["num_samples=6", "batch_size=256"]),
                       ("some", ["num_samples=6", "batch_size=2", "seeds='1,3-4'"])]:
        out = tmp_path / name
        result = run_script("sample.py", f"ckpt={ckpt}", *args, "sampler.name=ddim", "sampler.steps=3",
                            "sampler.eta=1", "device=cpu", f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = np.load(out / "samples.npz")
    assert runs["some"]["index"].tolist() == [1, 3, 4] and runs["all"]["index"].tolist() == list(range(6))
    diff = np.abs(runs["some"]["samples"].astype(int) - runs["all"]["samples"][[1, 3, 4]].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # the network ran on other batches: rounding at most
