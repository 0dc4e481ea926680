"""Class-conditional training: labels from every data set, label dropout, the "no label" class, sharding, resume
and the entry points on a conditional checkpoint."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from diffusion.config import CIFAR10DataConfig, DigitsDataConfig, ImageFolderDataConfig, MNISTDataConfig
from diffusion.core.images import to_model_range
from diffusion.data import EpochSampler
from diffusion.data.loader import _ModelInputs
from diffusion.errors import UserError
from diffusion.lightning.module import DiffusionModule
from diffusion.run.commands.evaluate import evaluate
from diffusion.run.commands.figures import figures
from diffusion.run.commands.train import train
from helpers import build, compose_cfg, diffusion_module, model_kwargs, run_script, train_cfg
from test_data import cifar_pattern, write_cifar, write_idx
from test_resume import assert_same_tensors
from test_resume import train as train_and_load

NET = {**model_kwargs("debug=fast"), "num_classes": 10}


def conditional_module(cond_drop_prob: float = 0.1) -> DiffusionModule:
    return diffusion_module(NET, cond_drop_prob=cond_drop_prob, class_names=[str(k) for k in range(10)])


# --- labels from the data ------------------------------------------------------------------------------------
def test_digits_labels_are_the_digits_of_their_images():
    data = build(DigitsDataConfig, batch_size=64)
    data.setup("fit")
    digits = load_digits()
    pixels = {bytes(np.rint(img * 255 / 16).astype(np.uint8).reshape(-1)): int(y)
              for img, y in zip(digits.images, digits.target, strict=True)}
    for split in ("train", "val"):
        images, labels = data.reference_images(split, 10_000), data.labels(split)
        assert [pixels[bytes(x.reshape(-1).numpy())] for x in images] == labels.tolist()
    assert data.class_names == [str(k) for k in range(10)] and data.num_classes == 10
    assert isinstance(next(iter(data.train_dataloader())), torch.Tensor)  # unconditional: images alone, as before
    data.with_labels = True
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.int64 and y.shape == (64,)


def test_mnist_and_cifar10_labels_are_read_from_their_files(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw", "train", np.zeros((20, 28, 28), np.uint8))
    write_idx(tmp_path / "MNIST" / "raw", "t10k", np.zeros((7, 28, 28), np.uint8))
    mnist = build(MNISTDataConfig, root=str(tmp_path), batch_size=4)
    assert mnist.labels("train").tolist() == [k % 10 for k in range(20)] and mnist.labels("val").shape == (7,)
    write_cifar(tmp_path, np.stack([cifar_pattern(i) for i in range(16)]), n_test=6)  # batch i is labelled i % 10
    cifar = build(CIFAR10DataConfig, root=str(tmp_path), batch_size=2)
    assert cifar.labels("train").tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and cifar.labels("val").tolist() == [5] * 6
    assert cifar.class_names[:2] == ["airplane", "automobile"]


def test_image_folder_classes_are_its_sorted_subfolders(tmp_path):
    for name, value in (("zebra", 200), ("ant", 10), ("cat", 100)):
        for i in range(3):
            (tmp_path / name / ("deep" if i else "")).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), value + i, np.uint8)).save(tmp_path / name / ("deep" if i else "")
                                                                        / f"{i}.png")
    data = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=2, image_size=8, val_fraction=0.2)
    assert data.class_names == ["ant", "cat", "zebra"]
    for split in ("train", "val"):  # each image's label is its top folder's index, whatever lies between
        images, labels = data.reference_images(split, 100), data.labels(split)
        assert [{10: 0, 100: 1, 200: 2}[int(x.min()) // 10 * 10] for x in images] == labels.tolist()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(UserError, match=r"1 images outside any class subfolder .*\(model.num_classes=null\)"):
        _ = build(ImageFolderDataConfig, root=str(tmp_path), batch_size=2, image_size=8).class_names


# --- label dropout ----------------------------------------------------------------------------------------
def test_label_dropout_is_at_its_rate_seeded_and_leaves_t_and_eps_alone():
    x0, n = torch.zeros(4000, 1, 8, 8), 4000
    conditional, plain = conditional_module(0.1), diffusion_module(model_kwargs("debug=fast"))
    torch.manual_seed(7)
    t, _, eps, dropped = conditional._draw(x0, 0)
    torch.manual_seed(7)
    t_plain, _, eps_plain = plain._draw(x0, 0)
    assert torch.equal(t, t_plain) and torch.equal(eps, eps_plain)  # drawn after (t, ε): the same noise
    assert abs(dropped.double().mean().item() - 0.1) < 4 * (0.1 * 0.9 / n) ** 0.5  # 4 standard errors
    torch.manual_seed(7)
    assert torch.equal(conditional._draw(x0, 0)[3], dropped)  # seeded by the global RNG, as t and ε
    for p in (0.0, 1.0):
        torch.manual_seed(7)
        assert conditional_module(p)._draw(x0, 0)[3].double().mean().item() == p


def test_each_rank_keeps_its_rows_of_the_global_dropout_draw():
    """Under DDP, rank r keeps rows r, r + W, ... of the global step's (t, ε, dropped): as one big batch."""
    module, x0 = conditional_module(0.5), torch.zeros(8, 1, 8, 8)
    torch.manual_seed(3)
    t, _, eps, dropped = module._draw(torch.zeros(16, 1, 8, 8), 0)
    for rank in (0, 1):
        module._trainer, module._step_draw = SimpleNamespace(world_size=2, global_rank=rank,
                                                             accumulate_grad_batches=1), None
        torch.manual_seed(3)
        t_r, _, eps_r, dropped_r = module._draw(x0, 0)
        assert torch.equal(t_r, t[rank::2]) and torch.equal(eps_r, eps[rank::2])
        assert torch.equal(dropped_r, dropped[rank::2])
    module._trainer = None


def test_labels_travel_with_their_images_through_the_sharded_sampler():
    images = torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    dataset = _ModelInputs(images, labels)
    one = list(EpochSampler(dataset, seed=0, random_flip=True))
    ranks = [list(EpochSampler(dataset, seed=0, random_flip=True, num_replicas=2, rank=r)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(one)  # the two ranks deal out the one-device epoch
    for key in ranks[0] + ranks[1]:
        x, y = dataset[key]
        index = round((x[0, 0, 0].item() + 1) * 127.5)  # the image says which one it is
        assert y == labels[index]
        assert torch.equal(x, to_model_range(images[index].flip(-1) if key[1] else images[index]))


def test_the_no_label_embedding_is_trained_when_labels_are_dropped():
    gradients = {}
    for p in (1.0, 0.0):
        module = conditional_module(p)
        with torch.no_grad():  # random weights everywhere (the zero-initialised layers too), so gradients flow
            for param in module.net.parameters():
                param.add_(0.02 * torch.randn_like(param))
        torch.manual_seed(0)
        x0, y = torch.randn(16, 1, 8, 8).clamp(-1, 1), torch.arange(16) % 10
        module.training_step((x0, y), 0).backward()
        gradients[p] = module.net.label_emb.weight.grad.abs().sum(1)  # (11,) one per class, "no label" last
    assert gradients[1.0][10] > 0 and torch.all(gradients[1.0][:10] == 0)  # every label dropped: only "no label"
    assert gradients[0.0][10] == 0 and torch.all(gradients[0.0][:10] > 0)  # none dropped: the ten classes


def test_an_unconditional_module_saves_no_label_settings():
    module = diffusion_module(model_kwargs("debug=fast"))
    assert "cond_drop_prob" not in module.hparams and "class_names" not in module.hparams
    assert module.hparams["net"]["num_classes"] is None and not hasattr(module.net, "label_emb")


# --- a conditional run and its checkpoint in every entry point -----------------------------------------------
@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cond")
    train(train_cfg(out, "model.num_classes=10", "logger=none", "callbacks.samples.num_samples=20"))
    return out


def test_a_conditional_run_stores_its_classes_and_draws_a_row_per_class(conditional_run):
    ckpt = torch.load(conditional_run / "checkpoints" / "last.ckpt", weights_only=True)
    names = [str(k) for k in range(10)]
    assert ckpt["hyper_parameters"]["class_names"] == names and ckpt["hyper_parameters"]["net"]["num_classes"] == 10
    assert json.loads((conditional_run / "classes.json").read_text()) == names
    grid = np.asarray(Image.open(conditional_run / "samples" / "final_ema.png"))
    assert grid.shape[0] == 10 * 34 + 2 and grid.shape[1] == 2 * 34 + 2  # 10 rows (one per digit) of 2, at 32 px


@pytest.mark.slow
def test_sample_py_draws_the_labels_asked_for_and_refuses_others(conditional_run, tmp_path):
    ckpt = conditional_run / "checkpoints" / "last.ckpt"
    done = run_script("sample.py", f"ckpt={ckpt}", "num_samples=5", "labels=[3,3,7]", "sampler.name=ddim",
                      "sampler.steps=3", "sampler.guidance_scale=2", f"output_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = np.load(tmp_path / "samples.npz")
    assert saved["labels"].tolist() == [3, 3, 7, 3, 3] and saved["samples"].shape == (5, 8, 8, 1)
    bad = run_script("sample.py", f"ckpt={ckpt}", "labels=[12]", f"output_dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: labels holds 12, outside")


def test_evaluate_sweeps_the_guidance_scale_and_figures_draw(conditional_run, tmp_path):
    ckpt = conditional_run / "checkpoints" / "last.ckpt"
    report = evaluate(compose_cfg("evaluate", [f"ckpt={ckpt}", "num_samples=20", "logger=none", "batch_size=8",
                                                   "sampler.name=ddim", "sampler.steps=2", "bpd.enabled=false",
                                                   "max_reference_images=40", "guidance_table=[0,2]"], tmp_path / "e"))
    rows = report["guidance_table"]
    assert [r["guidance_scale"] for r in rows] == [0.0, 2.0]
    assert all(0 <= r["class_accuracy"] <= 1 and r["fid_train"] > 0 for r in rows)
    assert json.loads((tmp_path / "e" / "guidance.json").read_text())[1]["fid_train"] == rows[1]["fid_train"]
    assert (tmp_path / "e" / "guidance.png").stat().st_size > 0
    assert "| 2 |" in (tmp_path / "e" / "guidance.md").read_text()
    paths = figures(compose_cfg("figures", [f"ckpt={ckpt}", "num_samples=10", "rd_images=8", "sampler.name=ddim",
                                                "sampler.steps=2", "sampler.guidance_scale=1.5"], tmp_path / "f"))
    assert np.asarray(Image.open(paths["samples"])).shape[0] == 10 * 34 + 2  # a row per digit


@pytest.mark.slow
def test_guidance_of_an_unconditional_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "plain"
    train(train_cfg(out, "logger=none", "callbacks.samples=null", "trainer.max_steps=1"))
    bad = run_script("sample.py", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "sampler.guidance_scale=2",
                     f"output_dir={tmp_path / 's'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: sampler.guidance_scale=2 guides a class-conditional model, but the checkpoint is unconditional "
        "(trained without model.num_classes); drop sampler.guidance_scale")
    assert not (tmp_path / "s" / "samples.npz").exists()
    with pytest.raises(UserError, match="callbacks.samples.sampler.guidance_scale=2.0 needs a class-conditional"):
        train(train_cfg(tmp_path / "again", "callbacks.samples.sampler.guidance_scale=2"))


@pytest.mark.slow
def test_labels_survive_a_stop_and_resume_bit_for_bit(tmp_path):
    # batch 64: 23 steps an epoch, so the stop at step 2 is mid-epoch; the dropped labels come from the saved RNG
    args = ("model.num_classes=10", "training.cond_drop_prob=0.5", "data.batch_size=64", "validation.bpd_images=0")
    full = train_and_load(tmp_path / "full", "trainer.max_steps=4", *args)
    first = train_and_load(tmp_path / "first", "trainer.max_steps=2", *args)
    resumed = train_and_load(tmp_path / "resumed", "trainer.max_steps=4", *args,
                             f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert_same_tensors(full["ckpt"]["current_model_state"], resumed["ckpt"]["current_model_state"], "raw weights")
    assert len(full["losses"]) == 4 and {**first["losses"], **resumed["losses"]} == full["losses"]


def test_a_class_count_that_is_not_the_datas_is_an_error_before_training(tmp_path):
    with pytest.raises(UserError, match="model.num_classes=7, but digits has 10 classes; set model.num_classes=10"):
        train(train_cfg(tmp_path, "model.num_classes=7", "logger=none"))
    assert not (tmp_path / "checkpoints").exists()


def test_a_conditional_net_is_not_exported_to_diffusers():
    from diffusion.formats.diffusers_unet import unet_config_from_kwargs

    assert unet_config_from_kwargs(model_kwargs("debug=fast"), False)["sample_size"] == 8
    with pytest.raises(UserError, match="class-conditional U-Net .* cannot be exported"):
        unet_config_from_kwargs(NET, False)


def test_the_best_w_is_the_lowest_fd_among_those_that_follow_their_labels():
    from diffusion.run.reports.guidance_table import best_row

    rows = [{"guidance_scale": w, "fid_train": fd, "class_accuracy": acc}
            for w, fd, acc in [(0, 0.28, 0.11), (1, 0.11, 0.92), (2, 0.12, 0.996), (3, 0.25, 1.0)]]
    assert best_row(rows)["guidance_scale"] == 2  # not w=3: 100% classified, but twice the FD
    assert best_row(rows[:2])["guidance_scale"] == 1  # none reaches 95%: the most accurate
    unclassified = [{"guidance_scale": w, "fid_train": fd} for w, fd in [(0, 0.3), (1, 0.2), (2, 0.25)]]
    assert best_row(unclassified)["guidance_scale"] == 1
