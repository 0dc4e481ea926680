"""FD-DINOv2 beside FID: the real DINOv2 ViT-L/14 architecture (timm's) with random weights these tests write in the
official torch.hub checkpoint's format and timm's, through the real loading path; its score in SampleQuality, in
evaluate.py's report.json, the sampler table and the sweep report; the default protocol as before.

ViT-L is ~300M parameters, about 2.5 s an image on two CPU cores: the tests pass it few, tiny images."""

import json
import math

import pytest
import torch

from diffusion.config.validation import validate_entry
from diffusion.core.sampling import SamplerSpec
from diffusion.data import load_digits_split
from diffusion.errors import UserError
from diffusion.metrics.features import DINOV2_FILE, DINOV2_URL, DINOv2Features, make_dinov2
from diffusion.metrics.quality import (
    SCORES,
    SampleQuality,
    brief_keys,
    column_title,
    logged_name,
    make_protocol,
    measurement_id,
    protocol_id,
)
from diffusion.run.commands.train import train
from helpers import compose_cfg, ddpm, run_script, train_cfg


def dinov2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random DINOv2 ViT-L/14 weights with the official checkpoint's keys and shapes (518x518: a 37x37 position
    embedding, and the mask token), scaled so that the features depend on the image."""
    import timm

    with torch.device("meta"):
        net = timm.create_model("vit_large_patch14_dinov2", num_classes=0)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = torch.ones(shape)
        elif key.endswith(".gamma"):
            state[key] = torch.full(shape, 0.1)
        elif len(shape) >= 2 and key.endswith("weight"):
            state[key] = torch.randn(shape, generator=gen) / math.prod(shape[1:]) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.02
    state["mask_token"] = torch.zeros(1, 1024)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 1024)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The official format's file (dinov2_vitl14_pretrain.pth: cls_token, pos_embed, mask_token, blocks.N...)."""
    path = tmp_path_factory.mktemp("dinov2") / DINOV2_FILE
    torch.save(dinov2_state(), path)
    return path


@pytest.fixture(scope="module")
def official(weights):
    """The extractor loaded from the official format's file (shared: loading and hashing 300M weights takes seconds)."""
    return make_dinov2({"enabled": True, "weights_path": str(weights)})


def digits(n: int, offset: int = 0) -> torch.Tensor:
    images, _ = load_digits_split("train")
    return images[offset:offset + n]


@pytest.mark.slow
def test_fd_dinov2_of_a_set_against_itself_is_zero_and_grows_with_a_shift(official):
    """Two digits against themselves: FD-DINOv2 ~0; brightened by 80 grey levels: far from 0. The other scores
    are those of the same metric without FD-DINOv2; generated features go through extract()'s dict (gen_dinov2)."""
    images = digits(2)
    metric = SampleQuality("digits", k=1, dinov2=official)
    plain = SampleQuality("digits", k=1)
    assert isinstance(metric.dinov2, DINOv2Features) and metric.dinov2.name == "dinov2-vitl14"
    assert official.net.pos_embed.shape == (1, 1 + 16 * 16, 1024)  # resampled once to 224x224's grid
    for m in (metric, plain):
        m.set_reference("train", images)
    parts = metric.extract(images, torch.arange(2))
    assert parts["gen_dinov2"].shape == (2, 1024) and parts["gen_dinov2"].dtype == torch.float64
    metric.add(parts)  # as evaluate.py adds back a saved shard
    plain.update(images)
    same, without = metric.compute(), plain.compute()
    assert {k: v for k, v in same.items() if not k.startswith("fd_dinov2")} == without
    assert "fd_dinov2_train" not in without and list(same).index("fd_dinov2_train") == 1  # beside FID

    metric.reset()
    metric.update((images.int() + 80).clamp(max=255).to(torch.uint8))
    shifted = metric.compute()["fd_dinov2_train"]
    # ~0 up to the eigenvalues' rounding (2 samples: 1024-d covariances of rank 1)
    assert abs(same["fd_dinov2_train"]) < 1e-3 * shifted and shifted > 1e-2


@pytest.mark.slow
def test_the_same_network_from_timms_format_and_unreadable_files_are_one_line(official, tmp_path):
    """timm's copy of the checkpoint (no mask token, .safetensors) loads to the same weights as the official file;
    a file that is not DINOv2 ViT-L/14, or not a checkpoint, is a one-line error naming it."""
    from safetensors.torch import save_file

    state = {k: v for k, v in dinov2_state().items() if k != "mask_token"}
    save_file(state, tmp_path / "model.safetensors")
    assert DINOv2Features(str(tmp_path / "model.safetensors")).weights_sha256 == official.weights_sha256

    torch.save({"pos_embed": state["pos_embed"], "cls_token": state["cls_token"]}, tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for name, says in (("partial.pth", "not DINOv2 ViT-L/14"), ("junk.pth", "cannot load DINOv2 weights")):
        with pytest.raises(UserError, match=says) as err:
            DINOv2Features(str(tmp_path / name))
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value) and DINOV2_URL in str(err.value)


def test_missing_dinov2_weights_are_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        make_dinov2({"enabled": True, "weights_path": None})
    message = str(err.value)
    assert "\n" not in message
    assert f"put {DINOV2_FILE} in {tmp_path / 'hub' / 'checkpoints'}/" in message
    assert DINOV2_URL in message and "callbacks.quality.fd_dinov2.weights_path=" in message
    assert make_dinov2({"enabled": False, "weights_path": None}) is None and make_dinov2(None) is None


@pytest.mark.slow
def test_train_and_evaluate_without_the_weights_stop_before_sampling_with_that_line(tiny_ckpt, tmp_path,
                                                                                  monkeypatch):
    """evaluate.py and train.py's preflight, FD-DINOv2 on, no file in the torch hub cache: exit 2, one line."""
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    result = run_script("evaluate.py", f"ckpt={tiny_ckpt}", "fd_dinov2.enabled=true", "logger=none",
                        f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path, env=env)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"put {DINOV2_FILE} in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in lines[0] and DINOV2_URL in lines[0]
    assert "evaluating" not in result.stdout  # before any sampling

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=f"put {DINOV2_FILE} in ") as err:
        train(train_cfg(tmp_path / "train", "logger=none", "callbacks.samples=null", "trainer.max_steps=1",
                        "callbacks.quality.at_train_end=true", "callbacks.quality.fd_dinov2.enabled=true"))
    assert "\n" not in str(err.value) and not list((tmp_path / "train").rglob("*.ckpt"))  # before the first step


def test_weights_path_without_enabled_or_not_a_file_is_a_config_error(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    for entry, key in (("evaluate", "fd_dinov2"), ("train", "callbacks.quality.fd_dinov2")):
        base = ["ckpt=x.ckpt", "logger=none"] if entry == "evaluate" else ["debug=fast", "logger=none"]
        cfg = compose_cfg(entry, [*base, f"{key}.weights_path={tmp_path / 'w.pth'}"], tmp_path)
        with pytest.raises(UserError, match=f"{key}.weights_path=.* is read only with {key}.enabled=true"):
            validate_entry(entry, cfg)
        cfg = compose_cfg(entry, [*base, f"{key}.weights_path={tmp_path / 'no.pth'}", f"{key}.enabled=true"],
                          tmp_path)
        with pytest.raises(UserError, match=f"{key}.weights_path=.* is not a file; give the path of DINOv2"):
            validate_entry(entry, cfg)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    train(train_cfg(out, "logger=none", "callbacks.samples=null"))
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_evaluate_reports_fd_dinov2_in_report_json_the_sampler_table_and_the_sweep_report(tiny_ckpt, weights,
                                                                                           tmp_path):
    from diffusion.run.commands.report import report

    result = run_script("evaluate.py", f"ckpt={tiny_ckpt}", "num_samples=4", "batch_size=4", "sampler.name=ddim",
                        "sampler.steps=2", "sampler.eta=0", "max_reference_images=4", "reference_splits=[train]",
                        "bpd.enabled=false", "fd_dinov2.enabled=true", f"fd_dinov2.weights_path={weights}",
                        "sampler_table.enabled=true", "sampler_table.samplers=[{name: ddim, steps: 2}]",
                        "logger=none", "progress_bar=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert math.isfinite(rep["quality"]["fd_dinov2_train"]) and rep["quality"]["fd_dinov2_train"] > 0
    assert rep["protocol"]["fd_dinov2"]["extractor"] == "dinov2-vitl14"
    assert len(rep["protocol"]["fd_dinov2"]["extractor_sha256"]) == 12
    assert "eval/fd_dinov2_train" in json.loads((tmp_path / "status.json").read_text())["metrics"]
    assert "FD-DINOv2" in result.stdout or "fd_dinov2" in result.stdout
    lines = (tmp_path / "samplers.md").read_text().splitlines()
    assert "| sampler | NFE | s / image | FD (train) | FD-DINOv2 (train) | KID | precision | recall | IS |" in lines

    report([tmp_path], out=tmp_path / "sweep", use_wandb=False)
    md = (tmp_path / "sweep" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert "eval/fd_dinov2_train [" in header and "eval/fid_train [" in header
    assert "dinov2-vitl14 sha" in md  # the measurement's description names the second network


def test_fd_dinov2_is_one_entry_of_scores_logged_per_split_like_fid():
    assert [s.name for s in SCORES][:2] == ["fid", "fd_dinov2"]
    assert brief_keys()[:4] == ["fid_train", "fid_val", "fd_dinov2_train", "fd_dinov2_val"]
    assert logged_name("fd_dinov2_train") == "val/fd_dinov2" and logged_name("fd_dinov2_val") == "val/fd_dinov2_test"
    assert column_title("fd_dinov2_val") == "FD-DINOv2 (val)"


class Named:
    def __init__(self, name: str, sha: str):
        self.name, self.weights_sha256 = name, sha


def test_the_protocol_without_fd_dinov2_is_as_before_and_with_it_another():
    """Off (the default) the protocol has no fd_dinov2 entry, so its id is the one runs had before; on, it names
    DINOv2's network and weights, another protocol and another measurement."""
    common = dict(num_generated=1000, reference_sizes={"train": 1500, "val": 297},
                  extractor=Named("digits-cnn-v1", "0505ec543d97" + "0" * 52),
                  sampler=SamplerSpec(name="ddim", steps=50, eta=0.0), objective=ddpm(), weights="ema", seed=0,
                  settings={})
    off = make_protocol(**common)
    assert off == make_protocol(**common, dinov2=None) and "fd_dinov2" not in off
    assert set(off) == {"num_generated", "reference", "extractor", "extractor_sha256", "sampler", "num_timesteps",
                        "variance", "weights", "seed", "settings"}
    on = make_protocol(**common, dinov2=Named("dinov2-vitl14", "ab" * 32))
    assert on["fd_dinov2"] == {"extractor": "dinov2-vitl14", "extractor_sha256": "ab" * 6,
                               "resize": "224x224 bicubic antialias"}
    assert protocol_id(on) != protocol_id(off) and measurement_id(on) != measurement_id(off)


def test_optimized_metric_may_name_fd_dinov2_only_when_it_is_on(tmp_path):
    from diffusion.config.validation import logged_metrics

    cfg = compose_cfg("train", ["logger=none"], tmp_path)
    assert "val/fid" in logged_metrics(cfg) and "val/fd_dinov2" not in logged_metrics(cfg)
    cfg.callbacks.quality.fd_dinov2.enabled = True
    assert {"val/fd_dinov2", "val/fd_dinov2_test"} <= logged_metrics(cfg)
