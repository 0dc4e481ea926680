"""A resume is the same run: on the data it was trained on (else refused, init_from named), in the same W&B run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import ImageFolderDataConfig
from diffusion.errors import UserError
from diffusion.run.commands.train import train
from helpers import build, train_cfg

BAD_INPUT_CASES = [  # (what, the part of the one line the tests check) for docs/bad_inputs.md
    ("train.py ckpt_path= a digits checkpoint, data= an image folder of the same shape",
     "drop ckpt_path and set init_from=<ckpt> to start from its weights on this data"),
    ("train.py run again in a run directory whose checkpoint was trained on other data",
     "use another hydra.run.dir with init_from=<ckpt> to start from its weights on this data"),
]
QUIET = ["callbacks.samples=null", "logger=none"]
FOLDER = ["data=image_folder", "model=digits", "data.channels=1", "data.image_size=8",  # digits' 1×8×8
          "data.num_workers=0"]


def write_folder(root: Path, n: int = 40, flat: bool = False) -> Path:
    """n grey 8×8 PNGs (noise, or flat grey): with val_fraction 0.05, 38 train and 2 val images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.full((8, 8), i, np.uint8) if flat else rng.integers(0, 256, (8, 8), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """Two steps on the digits; its run directory."""
    out = tmp_path_factory.mktemp("digits")
    train(train_cfg(out, "trainer.max_steps=2", *QUIET))
    return out


def refusal(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as err:
        train(train_cfg(tmp_path, *QUIET, "trainer.max_steps=4", *overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_resuming_a_digits_run_on_an_image_folder_of_the_same_shape_is_refused(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    folder = write_folder(tmp_path / "faces")
    message = refusal(tmp_path / "run", *FOLDER, f"data.root={folder}", f"ckpt_path={ckpt}")
    assert message.startswith(f"checkpoint {ckpt} was trained on digits (scikit-learn's load_digits, 1500+297 "
                              "images, fingerprint ")
    assert f"this run's data is image folder ({folder}, 38+2 images, fingerprint " in message
    assert f"drop ckpt_path and set init_from={ckpt} to start from its weights on this data" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained


def test_resuming_on_other_digits_is_refused(digits_run, tmp_path):
    """The same data set, split otherwise: other images in train."""
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    message = refusal(tmp_path, "data.val_size=300", f"ckpt_path={ckpt}")
    assert "trained on digits (scikit-learn's load_digits, 1500+297 images" in message
    assert "this run's data is digits (scikit-learn's load_digits, 1497+300 images" in message


def test_resuming_on_another_folder_of_the_same_names_and_count_is_refused(tmp_path):
    """Only the contents differ (the fingerprint); where the folder lies does not count: a copy resumes."""
    first = tmp_path / "first"
    train(train_cfg(first, *QUIET, *FOLDER, f"data.root={write_folder(tmp_path / 'a')}", "trainer.max_steps=2"))
    ckpt = first / "checkpoints" / "last.ckpt"
    other = write_folder(tmp_path / "b", flat=True)
    message = refusal(tmp_path / "run", *FOLDER, f"data.root={other}", f"ckpt_path={ckpt}")
    assert f"trained on image folder ({tmp_path / 'a'}, 38+2 images, fingerprint " in message
    assert f"this run's data is image folder ({other}, 38+2 images, fingerprint " in message
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    train(train_cfg(tmp_path / "copied", *QUIET, *FOLDER, f"data.root={tmp_path / 'copy'}", "trainer.max_steps=3",
                    f"ckpt_path={ckpt}"))
    assert torch.load(tmp_path / "copied" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_requeued_run_on_other_data_names_another_run_directory(digits_run, tmp_path):
    """Resumed from the run directory's own last.ckpt (a SLURM requeue, train.py run again there)."""
    run = tmp_path / "run"
    shutil.copytree(digits_run / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "last.ckpt"
    message = refusal(run, *FOLDER, f"data.root={write_folder(tmp_path / 'faces')}")
    assert message.startswith(f"run directory {run} holds a checkpoint trained on digits (")
    assert f"use another hydra.run.dir with init_from={ckpt} to start from its weights on this data" in message


def test_a_checkpoint_that_records_no_data_still_resumes(digits_run, tmp_path, capsys):
    old = tmp_path / "old.ckpt"
    state = torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)
    del state["data"]
    torch.save(state, old)
    train(train_cfg(tmp_path / "run", *QUIET, "trainer.max_steps=3", f"ckpt_path={old}"))
    assert f"{old} does not record its data" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3 and resumed["data"]["name"] == "digits"


def folder_identity(root: Path) -> dict:
    data = build(ImageFolderDataConfig, root=str(root), batch_size=4, image_size=8, channels=1, num_workers=0)
    data.setup("fit")
    return data.identity


def test_a_copy_of_the_folder_is_the_same_data_and_a_changed_file_is_not(tmp_path):
    original = folder_identity(write_folder(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = folder_identity(tmp_path / "b")
    assert copy["root"] == str(tmp_path / "b") and original["root"] == str(tmp_path / "a")
    assert {**copy, "root": None} == {**original, "root": None}
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "b" / "07.png")  # another size on disk
    assert folder_identity(tmp_path / "b")["fingerprint"] != original["fingerprint"]


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run id of each offline W&B run under run_dir, in start order, as wandb's own reader reads it back."""
    exe = Path(sys.executable).parent / "wandb"
    ids = []
    for folder in sorted(run_dir.glob("wandb/offline-run-*")):
        out = subprocess.run([str(exe), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        (run,) = [r["run"] for r in records if r.get("type") == "run"]
        assert folder.name.endswith(f"-{run['run_id']}")  # what `wandb sync` uploads it as
        ids.append(run["run_id"])
    return ids


def test_a_resume_and_a_requeue_continue_the_same_wandb_run_and_init_from_starts_a_new_one(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    train(train_cfg(first, "callbacks.samples=null", "trainer.max_steps=2"))  # logger: W&B, offline
    (run_id,) = wandb_run_ids(first)
    ckpt = first / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["wandb_run_id"] == run_id
    assert (first / "wandb_run_id").read_text() == f"{run_id}\n"
    # ckpt_path (what a signal's message says to run): into a new run directory, the same W&B run
    train(train_cfg(resumed, "callbacks.samples=null", "trainer.max_steps=3", f"ckpt_path={ckpt}"))
    assert wandb_run_ids(resumed) == [run_id]
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"] == run_id
    # a requeue: train.py again into the run directory, which resumes its own last.ckpt
    train(train_cfg(first, "callbacks.samples=null", "trainer.max_steps=4"))
    assert wandb_run_ids(first) == [run_id, run_id]
    # a requeue before the first checkpoint: the run directory names the W&B run
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(first / "wandb_run_id", early)
    train(train_cfg(early, "callbacks.samples=null", "trainer.max_steps=1", "callbacks.checkpoint=null"))
    assert wandb_run_ids(early) == [run_id]
    # init_from starts a new run from the weights: a new W&B run
    train(train_cfg(tmp_path / "tuned", "callbacks.samples=null", "trainer.max_steps=1", f"init_from={ckpt}"))
    (new,) = wandb_run_ids(tmp_path / "tuned")
    assert new != run_id
