"""Sample-quality metrics: FID/KID/IS against independent numpy/scipy math, precision/recall limits, the digits
classifier and its cache, the Inception error, a real Trainer run, and DDP = one process."""

import csv
import os
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from diffusion.config import DigitsDataConfig, EMAConfig, SampleQualityConfig, validate
from diffusion.core.images import to_uint8
from diffusion.core.sampling import SamplerSpec, chunk_bounds, draw
from diffusion.data import load_digits_split
from diffusion.errors import UserError
from diffusion.lightning.callbacks import SampleQualityCallback
from diffusion.lightning.module import DiffusionModule
from diffusion.metrics import DigitsFeatures, InceptionFeatures, ModuleFeatures, SampleQuality, make_feature_extractor
from diffusion.metrics.features import INCEPTION_FILE, INCEPTION_URL
from diffusion.metrics.quality import make_protocol, protocol_id
from fuzz_cases import Case, outcome
from helpers import build, ddpm, diffusion_module, edm, flow, paper_betas, train_cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: one thread is many times faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    """A cache dir holding the digits classifier, trained once for this module."""
    path = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    first = DigitsFeatures(cache_dir=path)
    torch.set_num_threads(threads)
    assert first.trained_now
    return path


def flat_metric(**kwargs) -> SampleQuality:
    """The metric over raw pixels (features = the flattened uint8 image), so tests can choose the features."""
    return SampleQuality(ModuleFeatures(nn.Flatten(), "pixels"), **kwargs)


def random_images(gen: torch.Generator, n: int, low: int = 0, high: int = 256, size: int = 4) -> torch.Tensor:
    return torch.randint(low, high, (n, 1, size, size), generator=gen, dtype=torch.uint8)


# --- the math against independent computations ---------------------------------------------------------
def test_fid_equals_scipy_sqrtm_in_float64(gen):
    real, fake = random_images(gen, 300), random_images(gen, 200, 40, 220)
    metric = flat_metric(kid_subsets=1)
    metric.set_reference("r", real)
    metric.update(fake)
    x, y = real.flatten(1).numpy().astype(np.float64), fake.flatten(1).numpy().astype(np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metric.compute()["fid_r"] == pytest.approx(expected, rel=1e-9)


def test_kid_with_whole_sets_equals_the_unbiased_mmd(gen):
    real, fake = random_images(gen, 60), random_images(gen, 60, 30, 256)
    metric = flat_metric(kid_subsets=3, kid_subset_size=60)
    metric.set_reference("r", real)
    metric.update(fake)
    x, y = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3  # Binkowski et al. 2018: the cubic polynomial kernel

    m = len(x)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    scores = metric.compute()
    assert scores["kid_r"] == pytest.approx(expected, rel=1e-9)
    assert scores["kid_std_r"] == pytest.approx(0, abs=1e-6 * abs(expected))  # every subset is the whole set


def test_inception_score_equals_numpy(gen):
    logits = torch.randn(400, 7, generator=gen, dtype=torch.float64) * 3
    extractor = ModuleFeatures(_Logits(logits), "logits")
    metric = SampleQuality(extractor, is_splits=4)
    metric.set_reference("r", _numbered(range(100)))
    metric.update(_numbered(range(400)))
    p = torch.softmax(logits, 1).numpy()[torch.randperm(400, generator=torch.Generator().manual_seed(0)).numpy()]
    per_split = [np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()) for q in np.split(p, 4)]
    scores = metric.compute()
    assert scores["is"] == pytest.approx(np.mean(per_split), rel=1e-10)
    assert scores["is_std"] == pytest.approx(np.std(per_split), rel=1e-8)


def test_inception_score_of_samples_in_label_order():
    """A conditional model's balanced samples come sorted by label: 10 confident classes of 100 samples each
    score IS = 10 (every split sees every class), not 1 (one class per contiguous split)."""
    logits = torch.eye(10, dtype=torch.float64).repeat_interleave(100, 0) * 30  # (1000, 10), sorted by class
    extractor = ModuleFeatures(_Logits(logits), "logits")
    metric = SampleQuality(extractor, is_splits=10)
    metric.set_reference("r", _numbered(range(100)))
    metric.update(_numbered(range(1000)))
    assert metric.compute()["is"] == pytest.approx(10, rel=0.1)


def _numbered(numbers) -> torch.Tensor:
    """Images (N, 1, 1, 2) holding the number i in two bytes."""
    i = torch.tensor(list(numbers))
    return torch.stack([i // 256, i % 256], 1).to(torch.uint8).view(-1, 1, 1, 2)


class _Logits(nn.Module):
    """Maps the image holding the number i to (two features of i, row i of fixed logits)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor):
        index = images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()
        return torch.stack([index.double(), (index % 7).double()], 1), self.logits[index]


def test_precision_recall_identical_sets_are_one_and_far_apart_sets_zero(gen):
    images = random_images(gen, 80)
    metric = flat_metric(kid_subsets=1)
    metric.set_reference("same", images)
    metric.set_reference("far", random_images(gen, 80, 0, 30))  # pixel values 0..29 vs ...
    metric.update(images)
    scores = metric.compute()
    assert scores["precision_same"] == 1.0 and scores["recall_same"] == 1.0
    metric.reset()
    metric.update(random_images(gen, 80, 220, 256))  # ... 220..255: every distance far above every radius
    scores = metric.compute()
    assert scores["precision_far"] == 0.0 and scores["recall_far"] == 0.0


def test_chunk_bounds_cover_every_sample_once_whatever_the_world_size():
    for world in (1, 2, 3, 8):
        chunks = sorted(c for r in range(world) for c in chunk_bounds(103, 10, r, world))
        assert chunks == [(k, 10 * k, min(103, 10 * k + 10)) for k in range(11)]


def test_protocol_id_is_stable_and_changes_with_the_protocol(digits_cache):
    extractor = DigitsFeatures(cache_dir=digits_cache)
    kwargs = dict(num_generated=1000, reference_sizes={"train": 1500, "val": 297}, extractor=extractor,
                  sampler=SamplerSpec("ddim", steps=50), objective=ddpm(paper_betas(1000)), seed=0)
    ema, raw = make_protocol(weights="ema", **kwargs), make_protocol(weights="raw", **kwargs)
    assert protocol_id(ema) == protocol_id(make_protocol(weights="ema", **kwargs))
    assert protocol_id(ema) != protocol_id(raw) and len(protocol_id(ema)) == 8
    assert ema["extractor_sha256"] == extractor.weights_sha256[:12]
    assert ema["reference"]["val"] == {"num_images": 297, "augmentation": "none"}
    # DDPM adds exactly what protocols always held (T and the variance): the ids of DDPM scores are unchanged
    assert ema.keys() - {"num_generated", "reference", "extractor", "extractor_sha256", "sampler", "weights", "seed",
                         "settings"} == {"num_timesteps", "variance"}
    assert (ema["num_timesteps"], ema["variance"]) == (1000, "fixed_large")
    other_t = make_protocol(weights="ema", **{**kwargs, "objective": ddpm(paper_betas(500))})
    other_variance = make_protocol(weights="ema", **{**kwargs, "objective": ddpm(paper_betas(1000),
                                                                                  variance="fixed_small")})
    assert len({protocol_id(p) for p in (ema, other_t, other_variance)}) == 3
    # EDM and flow matching record their whole spec instead, so their scores never share an id with DDPM's
    for objective in (edm(), flow()):
        protocol = make_protocol(weights="ema", **{**kwargs, "objective": objective,
                                                   "sampler": SamplerSpec("heun", steps=9)})
        assert protocol["objective"] == objective.spec() and "num_timesteps" not in protocol
    assert protocol_id(make_protocol(weights="ema", **{**kwargs, "objective": edm(), "sampler": SamplerSpec("heun")})) \
        != protocol_id(make_protocol(weights="ema", **{**kwargs, "objective": flow(), "sampler": SamplerSpec("heun")}))


# --- the digits classifier and real digits --------------------------------------------------------------
def test_digits_classifier_is_cached_and_held_out_accuracy_high(digits_cache):
    files = list(digits_cache.glob("*.pt"))
    assert [f.name for f in files] == ["digits-cnn-v1.pt"]
    again = DigitsFeatures(cache_dir=digits_cache)
    assert not again.trained_now  # loaded, not retrained
    assert again.val_accuracy >= 0.9
    assert again.weights_sha256 == make_feature_extractor({"name": "digits", "cache_dir": str(digits_cache)}
                                                          ).weights_sha256
    # Trained on exactly the data module's train split: its val split is held out.
    datamodule = build(DigitsDataConfig)
    assert torch.equal(load_digits_split("train")[0], datamodule.reference_images("train", 10**6))
    assert torch.equal(load_digits_split("val")[0], datamodule.reference_images("val", 10**6))


def test_real_digits_score_near_zero_and_noise_far(digits_cache, gen):
    datamodule = build(DigitsDataConfig)
    metric = SampleQuality({"name": "digits", "cache_dir": str(digits_cache)})
    metric.set_reference("train", datamodule.reference_images("train", 10**6))
    metric.update(datamodule.reference_images("val", 10**6))  # held-out real digits
    real = metric.compute()
    metric.reset()
    metric.update(torch.randint(0, 256, (297, 1, 8, 8), generator=gen, dtype=torch.uint8))
    noise = metric.compute()
    assert noise["fid_train"] > 50 * real["fid_train"]
    assert noise["kid_train"] > 50 * abs(real["kid_train"])
    assert real["precision_train"] > 0.8 and real["recall_train"] > 0.8 and noise["recall_train"] < 0.2
    assert real["is"] > 7 and noise["is"] < 4  # ten balanced, well-recognised classes vs one blur of guesses


def test_digits_extractor_rejects_other_shapes(digits_cache):
    with pytest.raises(UserError, match="1x8x8"):
        DigitsFeatures(cache_dir=digits_cache)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_unknown_extractor_is_a_one_line_error():
    with pytest.raises(UserError, match="got 'vgg'") as err:
        make_feature_extractor("vgg")
    assert "\n" not in str(err.value)


# --- Inception -------------------------------------------------------------------------------------------
def test_missing_inception_weights_are_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        make_feature_extractor({"name": "inception", "weights_path": None, "cache_dir": None})
    message = str(err.value)
    assert "\n" not in message
    assert f"put {INCEPTION_FILE} in {tmp_path / 'hub' / 'checkpoints'}/" in message
    assert INCEPTION_URL in message and "feature_extractor.weights_path=" in message


@pytest.mark.slow
def test_inception_features_from_a_weights_file(tmp_path):
    """Random Inception weights in the file format torch-fidelity reads; grey images are repeated to RGB."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Unloaded(NoTrainInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    torch.save(Unloaded("x", ["2048"], str(tmp_path / "empty.pth")).state_dict(), tmp_path / INCEPTION_FILE)
    extractor = InceptionFeatures(str(tmp_path / INCEPTION_FILE))
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    features, logits = extractor(grey)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008) and len(extractor.weights_sha256) == 64
    torch.testing.assert_close(extractor(grey.repeat(1, 3, 1, 1))[0], features)


# --- the callback: a real Trainer, and DDP = one process ------------------------------------------------
def tiny_module() -> DiffusionModule:
    """An untrained 1x8x8 U-Net (ch=8) over T=10 steps: the same weights in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusion_module(dict(in_channels=1, out_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                     attn_resolutions=(), dropout=0.0, image_size=8, num_groups=4),
                                objective=ddpm(paper_betas(10)))


def quality_callback(cache: str, **kwargs) -> SampleQualityCallback:
    return build(SampleQualityConfig, sampler={"name": "ddim", "steps": 3}, seed=1, max_reference_images=200,
                 feature_extractor={"name": "digits", "cache_dir": cache}, **kwargs)


def test_callback_in_a_trainer_logs_every_n_steps_and_at_the_end(tmp_path, digits_cache, capsys):
    module, callback = tiny_module(), quality_callback(str(digits_cache), every_n_steps=2, num_samples=40,
                                                      batch_size=16)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[build(EMAConfig, decay=0.9), callback], enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=build(DigitsDataConfig, batch_size=32))
    log_dir = Path(trainer.logger.log_dir)
    rows = [r for r in csv.DictReader(open(log_dir / "metrics.csv")) if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [2, 4, 5]  # every 2 steps, and the end (step 5)
    assert {"val/fid", "val/fid_test", "val/is", "val/kid", "val/precision", "val/recall"} <= set(rows[0])
    assert float(rows[-1]["val/fid"]) == pytest.approx(callback.last_scores["val/fid"], rel=1e-6)
    assert trainer.callback_metrics["val/fid_test"].item() == pytest.approx(callback.last_scores["val/fid_test"])
    hparams = yaml.safe_load(open(log_dir / "hparams.yaml"))
    assert hparams["quality_protocol_id"] == protocol_id(callback.protocol)
    assert callback.protocol["weights"] == "ema" and callback.protocol["reference"]["val"]["num_images"] == 200
    out = capsys.readouterr().out
    assert out.count(f"[protocol {protocol_id(callback.protocol)}: 40 samples ddim-3 η=0 ema vs train 200/val 200") == 3
    module.train()
    callback.evaluate(trainer, module)
    assert module.training  # put back as it was


def test_extra_samplers_are_logged_at_their_tag_against_the_same_reference_features(tmp_path, digits_cache, capsys,
                                                                                    monkeypatch):
    """`extra_samplers` log val/<score>@<tag> beside the main sampler's scores; each equals the score of the
    sampler's own draw, recomputed here; the real images pass through the extractor once per run."""
    extracted = []
    set_reference = SampleQuality.set_reference
    monkeypatch.setattr(SampleQuality, "set_reference",
                        lambda self, name, *a, **k: (extracted.append(name), set_reference(self, name, *a, **k))[1])
    module = tiny_module()
    callback = quality_callback(str(digits_cache), every_n_steps=1, num_samples=20, batch_size=10, weights="raw",
                                extra_samplers=[{"name": "dpmpp_2m", "steps": 3}, SamplerSpec("unipc", steps=5)])
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, enable_model_summary=False)
    trainer.fit(module, datamodule=build(DigitsDataConfig, batch_size=32))
    assert extracted == ["train", "val"]  # 2 evaluations x 3 samplers, one feature pass of the real images
    log_dir = Path(trainer.logger.log_dir)
    rows = [r for r in csv.DictReader(open(log_dir / "metrics.csv")) if r.get("val/fid")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    tags = ["dpmpp_2m-3", "unipc-5"]
    assert {f"val/{score}@{tag}" for score in ("fid", "fid_test", "is", "kid", "precision", "recall")
            for tag in tags} <= set(rows[-1])
    # an independent score of each sampler's own samples against freshly extracted reference features
    data, net = build(DigitsDataConfig), module.net.eval()
    for tag, spec in zip(tags, [SamplerSpec("dpmpp_2m", steps=3), SamplerSpec("unipc", steps=5)], strict=True):
        metric = SampleQuality(callback.feature_extractor)
        for split in ("train", "val"):
            metric.set_reference(split, data.reference_images(split, 200))
        drawn = draw(net, module.objective, spec, 20, shape=net.image_shape, seed=1, chunk_size=10)
        metric.update(to_uint8(drawn.images), drawn.index)
        expected = metric.compute()
        assert float(rows[-1][f"val/fid@{tag}"]) == pytest.approx(expected["fid_train"], rel=1e-6)
        assert float(rows[-1][f"val/fid_test@{tag}"]) == pytest.approx(expected["fid_val"], rel=1e-6)
        assert trainer.callback_metrics[f"val/is@{tag}"].item() == pytest.approx(expected["is"], rel=1e-6)
    assert float(rows[-1]["val/fid"]) != float(rows[-1]["val/fid@dpmpp_2m-3"])
    hparams = yaml.safe_load(open(log_dir / "hparams.yaml"))
    assert set(hparams["quality_extra_protocol_ids"]) == set(tags)
    assert hparams["quality_extra_protocol_ids"]["unipc-5"] != hparams["quality_protocol_id"]
    printed = [line for line in capsys.readouterr().out.splitlines() if "[protocol" in line]
    assert len(printed) == 2 and all("@" not in line and "ddim-3 η=0" in line for line in printed)


def test_extra_samplers_must_differ_and_fit_T(tmp_path):
    """Checked with the config, before anything is built: by train.py's validation, against the objective."""
    def refused(extra: str) -> str:
        cfg = train_cfg(tmp_path, "schedule.num_timesteps=10", f"callbacks.quality.extra_samplers={extra}")
        with pytest.raises(UserError) as info:
            validate(cfg)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert refused("[{name: heun, steps: 4},{name: heun, steps: 4}]").startswith(
        "callbacks.quality.extra_samplers[1] is heun-4 again (entry 0)")
    assert "extra_samplers[0].steps=21 exceeds what the model's T=10 steps" in refused("[{name: heun, steps: 21}]")
    assert refused("[{name: dpmpp}]").startswith("callbacks.quality.extra_samplers[0].name=dpmpp is not a sampler")
    # not a list: refused by the config, before anything is built (the callback takes what it is given)
    code, err = outcome(Case("train", "callbacks.quality.extra_samplers", "heun"))
    assert code == 2 and err.startswith("error: callbacks.quality.extra_samplers must be a list, got heun; write it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scores(cache: str, rank: int, world: int) -> list[dict[str, float]]:
    """The callback's sharded sampling + the synced metric, for uneven shards and for a rank with none."""
    module, results = tiny_module(), []
    reference = build(DigitsDataConfig).reference_images("train", 200)
    for num_samples, batch_size in ((50, 8), (6, 8)):  # chunks 4 + 3 over 2 ranks; 1 + 0
        callback = quality_callback(cache, every_n_steps=0, num_samples=num_samples, batch_size=batch_size)
        metric = SampleQuality(callback.feature_extractor)
        metric.set_reference("train", reference, batch_size=batch_size)
        callback.generate_and_update(metric, module.net.eval(), module, rank, world)
        results.append(metric.compute())
    return results


def _ddp_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = _scores(cache, rank, world)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_score_the_same_samples_as_one(tmp_path, digits_cache):
    single = _scores(str(digits_cache), 0, 1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(digits_cache), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        for ddp, one in zip(torch.load(tmp_path / f"rank{rank}.pt"), single, strict=True):
            assert ddp.keys() == one.keys()
            for key in one:
                assert ddp[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key


def test_to_uint8_inverts_the_data_range():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(levels.float() / 127.5 - 1), levels)


class PixelFeatures(torch.nn.Module):
    """A user's own extractor: raw pixels in [0, 1] as features."""

    def forward(self, images):
        return images.float().flatten(1) / 255


def test_any_module_by_import_path_scores_real_vs_real_near_zero_and_noise_far():
    extractor = make_feature_extractor({"name": "module", "target": f"{__name__}.PixelFeatures"})
    assert extractor.name.endswith("PixelFeatures")
    dm = build(DigitsDataConfig, batch_size=8)
    metric = SampleQuality(feature_extractor=extractor, kid_subset_size=100, kid_subsets=10)
    metric.set_reference("train", dm.reference_images("train", 600))
    metric.update(dm.reference_images("val", 297))
    real = metric.compute()["fid_train"]
    metric.reset()
    metric.update(torch.randint(0, 256, (297, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    assert real < 0.2 * metric.compute()["fid_train"]
    with pytest.raises(UserError, match="cannot be imported"):
        make_feature_extractor({"name": "module", "target": "no_such_package.Net"})
