"""data=streaming: prepare.py's LitData shards, trained from through the real entry points.

The digits (built in) are written as shards by the prepare command; the tests read them back bit for bit, train
from them, stop mid-epoch and resume (the same weights as the uninterrupted run, bit for bit), and split them over
two DDP processes (every image once per epoch across the ranks).
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusion.core.images import to_model_range
from diffusion.data import DigitsDataModule, StreamingDataModule, same_data
from diffusion.errors import UserError
from diffusion.run.commands.prepare import prepare
from diffusion.run.commands.train import train as train_command
from helpers import compose_cfg, run_script, train_cfg, wandb_history
from test_resume import assert_same_tensors

VAL_SIZE = 517  # 1,280 train digits: 20 batches of 32 per rank under 2-process DDP, 2.56 batches of 500
SHAPE = ["data=streaming", "data.channels=1", "data.image_size=8", "model=digits"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "digits"
    prepare(compose_cfg("prepare", [f"out={out}", f"data.val_size={VAL_SIZE}"], out.parent / "run"))
    return out


def module(shards: Path, **settings) -> StreamingDataModule:
    kwargs = {"batch_size": 32, "num_workers": 0, "seed": 0, "random_flip": False, "channels": 1, "image_size": 8}
    return StreamingDataModule(input_dir=str(shards), **{**kwargs, **settings})


def digits() -> DigitsDataModule:
    source = DigitsDataModule(batch_size=32, num_workers=0, seed=0, random_flip=False, val_size=VAL_SIZE,
                              on_device=None, channels=1, image_size=8)
    source.setup()
    return source


def keys(images: torch.Tensor) -> list[bytes]:
    """Each image's bytes, to count which images a loader gave."""
    return [x.numpy().tobytes() for x in images]


def test_prepare_writes_every_image_and_label_once_whole(shards):
    assert sorted(p.name for p in shards.iterdir()) == ["diffusion.json", "train", "val"]
    assert not [p for p in shards.parent.iterdir() if p.name.startswith(".")], "a temporary folder was left"
    source, streamed = digits(), module(shards)
    streamed.setup()
    for split in ("train", "val"):
        images = streamed.reference_images(split, 10_000)  # (N, 1, 8, 8) uint8, in the source's order
        assert torch.equal(images, source._split(split).images), split
        assert torch.equal(streamed.labels(split), source.labels(split)), split
    assert same_data(streamed.identity, source.identity) and streamed.identity["root"] == str(shards)
    assert json.loads((shards / "diffusion.json").read_text())["class_names"] == source.class_names


def test_batches_are_model_inputs_reshuffled_and_flipped_each_epoch(shards):
    streamed = module(shards, random_flip=True)
    streamed.with_labels = True
    loader = streamed.train_dataloader()
    train = to_model_range(digits()._split("train").images)  # (N, 1, 8, 8) in [-1, 1]
    seen = {key: (x, x.flip(-1)) for key, x in zip(keys(train), train, strict=True)}
    epochs = []
    for _ in range(2):
        batches = list(loader)
        x = torch.cat([b[0] for b in batches])  # (N, 1, 8, 8) float32
        assert x.dtype == torch.float32 and len(x) == 1280 and batches[0][1].dtype == torch.int64
        flipped = [not torch.equal(xi, next(v for k, v in seen.items() if torch.equal(v[0], xi) or
                                        torch.equal(v[1], xi))[0]) for xi in x[:64]]
        assert 10 < sum(flipped) < 54  # about half of them mirrored
        epochs.append(x)
    assert not torch.equal(epochs[0], epochs[1])  # another order (and other flips) in epoch 2


N = 5  # 1,280 images at batch 500: 2 steps an epoch; the stop at step 3 falls in the middle of epoch 2
RUN = [*SHAPE, "data.batch_size=500", "data.random_flip=true", "callbacks.samples=null", "trainer.deterministic=true",
       "trainer.val_check_interval=2", "callbacks.checkpoint.every_n_train_steps=1",
       "callbacks.checkpoint.save_top_k=0"]


def run(out: Path, shards: Path, *overrides: str) -> dict:
    train_command(train_cfg(out, *RUN, f"data.input_dir={shards}", *overrides))
    losses = {h["trainer/global_step"]: h["train/loss"] for h in wandb_history(out) if "train/loss" in h}
    return {"ckpt": torch.load(out / "checkpoints" / "last.ckpt", weights_only=True), "losses": losses}


def test_a_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(shards, tmp_path):
    full = run(tmp_path / "full", shards, f"trainer.max_steps={N}")
    first = run(tmp_path / "first", shards, "trainer.max_steps=3")
    loader_state = first["ckpt"]["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["num_samples_yielded"] == 500 and loader_state["current_epoch"] == 2  # LitData's, mid-epoch
    resumed = run(tmp_path / "resumed", shards, f"trainer.max_steps={N}",
                  f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert resumed["ckpt"]["global_step"] == full["ckpt"]["global_step"] == N
    assert_same_tensors(full["ckpt"]["current_model_state"], resumed["ckpt"]["current_model_state"], "raw weights")
    assert_same_tensors(full["ckpt"]["state_dict"], resumed["ckpt"]["state_dict"], "EMA weights")
    assert {**first["losses"], **resumed["losses"]} == full["losses"] and len(full["losses"]) == N


def _rank_epochs(rank: int, shards: str, out: str) -> None:
    """One of two gloo processes: this rank's train images of two epochs, saved for the test to count."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["STREAMING_TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loader = module(Path(shards), num_workers=1).train_dataloader()
    torch.save([torch.cat(list(loader)) for _ in range(2)], f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_see_each_image_once_per_epoch(shards, tmp_path):
    os.environ["STREAMING_TEST_PORT"] = str(29_500 + os.getpid() % 1000)
    mp.start_processes(_rank_epochs, args=(str(shards), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    every = sorted(keys(to_model_range(digits()._split("train").images)))
    for epoch in range(2):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 640
        assert sorted(keys(ranks[0][epoch]) + keys(ranks[1][epoch])) == every, f"epoch {epoch}"
    assert not torch.equal(ranks[0][0], ranks[0][1])  # reshuffled


@pytest.mark.ddp
@pytest.mark.slow
def test_train_py_trains_from_shards_under_ddp(shards, tmp_path):
    result = run_script("train.py", "debug=fast", *SHAPE, f"data.input_dir={shards}", "trainer=ddp_cpu",
                        "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["dataset"]["world_size"] == 2


def test_train_py_refuses_a_folder_without_shards_in_one_line(shards, tmp_path):
    result = run_script("train.py", "debug=fast", *SHAPE, f"data.input_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"data.input_dir={tmp_path} holds no shards of prepare.py" in result.stderr
    assert "python prepare.py data=<the data> out=DIR" in result.stderr


def test_bad_shards_and_outputs_are_one_line_errors(shards, tmp_path):
    from diffusion.data import check_input_dir

    with pytest.raises(UserError, match="hold 1x8x8 images; set data.channels=1 data.image_size=8"):
        check_input_dir(str(shards), 3, 32)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "diffusion.json").write_text((shards / "diffusion.json").read_text())
    with pytest.raises(UserError, match="has no LitData index train/index.json"):
        check_input_dir(str(copy), 1, 8)
    with pytest.raises(UserError, match=f"out={shards} already exists and is not an empty folder"):
        prepare(compose_cfg("prepare", [f"out={shards}"], tmp_path / "run"))
