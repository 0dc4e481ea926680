"""Post-hoc EMA (Karras et al. 2024): the σ_rel ↔ γ algebra, the power EMA, the least-squares reconstruction
against EMAs tracked directly in plain loops, and the callback under a real Trainer (snapshots, resume, failures).
"""

import errno
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.testing import assert_close

import diffusion.files as files
import diffusion.lightning.callbacks.posthoc_snapshots as callback_module
from diffusion.config import PostHocEMAConfig, validate
from diffusion.core.posthoc_ema import (
    SIGMA_REL_MAX,
    PowerEMA,
    decay_to_sigma_rel,
    fit_error,
    gamma_to_sigma_rel,
    load_posthoc_ema,
    power_ema_beta,
    profile_inner_products,
    reconstruct,
    reconstructable_range,
    sigma_rel_to_decay,
    sigma_rel_to_gamma,
    snapshot_contents,
    snapshot_name,
    solve_weights,
)
from diffusion.errors import UserError
from diffusion.lightning.callbacks.ema import ema_warmup_avg_fn
from diffusion.lightning.callbacks.posthoc_snapshots import PostHocEMA, write_atomically
from helpers import build, ddpm, diffusion_module, paper_betas, train_cfg

SIGMA_RELS = (0.05, 0.10)


def largest_root_gamma(sigma_rel: float) -> float:
    """γ by numpy's eigenvalue root finder on the cubic of EDM2 Eq. 126: independent of the Newton iteration."""
    s = sigma_rel**-2
    return float(np.roots([1, 7, 16 - s, 12 - s]).real.max())


def plain_power_ema(trajectory: list[torch.Tensor], gamma: float) -> torch.Tensor:
    """θ̂_t = β_t θ̂_{t-1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1), one tensor, step by step."""
    average = torch.zeros_like(trajectory[0])
    for t, theta in enumerate(trajectory, start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        average = beta * average + (1 - beta) * theta
    return average


def random_walk(steps: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """A few float64 tensors after each of `steps` steps: a drifting random walk, like weights under SGD."""
    shapes = {"w": (4, 3), "b": (3,), "scale": (1,)}
    theta = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    drift = {n: 0.02 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    out = []
    for _ in range(steps):
        theta = {n: v + drift[n] + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
                 for n, v in theta.items()}
        out.append(theta)
    return out


def tracked_run(trajectory, every: int) -> tuple[PowerEMA, list[int], list[float], list[dict]]:
    """PowerEMA over the trajectory, snapshotting both profiles every `every` steps (as the callback does)."""
    ema = PowerEMA(trajectory[0], SIGMA_RELS)
    steps, gammas, states = [], [], []
    for theta in trajectory:
        ema.update(list(theta.values()))
        if ema.step % every == 0:
            for k, gamma in enumerate(ema.gammas):
                steps.append(ema.step), gammas.append(gamma)
                states.append({n: v.clone() for n, v in ema.averaged(k).items()})
    return ema, steps, gammas, states


# σ_rel ↔ γ, β_t, and the classic EMA's σ_rel


@pytest.mark.parametrize("sigma_rel", [0.001, 0.01, 0.05, 0.10, 0.2, 0.28, SIGMA_REL_MAX])
def test_sigma_rel_to_gamma_is_the_largest_root_and_round_trips(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(max(largest_root_gamma(sigma_rel), 0.0), rel=1e-12, abs=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-13)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-10, abs=1e-12)


def test_sigma_rel_is_the_relative_std_of_the_continuous_profile():
    """sqrt((γ+1)/((γ+2)²(γ+3))) against the std of p(τ) = (γ+1)τ^γ on [0, 1] by the midpoint rule."""
    tau = (torch.arange(1_000_000, dtype=torch.float64) + 0.5) / 1_000_000
    for gamma in [0.0, 1.0, 6.94, 16.97, 100.0]:
        p = (gamma + 1) * tau**gamma / len(tau)
        mean = (p * tau).sum()
        std = ((p * (tau - mean) ** 2).sum()).sqrt()
        assert gamma_to_sigma_rel(gamma) == pytest.approx(float(std), rel=1e-6)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2's two tracked profiles
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert gamma_to_sigma_rel(0.0) == SIGMA_REL_MAX


def test_beta_gives_each_step_the_profile_integrated_over_that_step(gen):
    """With θ_t the unit vector e_t, θ̂_T holds the weight of every step: (t^(γ+1) − (t−1)^(γ+1)) / T^(γ+1)."""
    T, gamma = 400, sigma_rel_to_gamma(0.1)
    assert power_ema_beta(1, gamma) == 0.0 and power_ema_beta(2, gamma) == pytest.approx(0.5 ** (gamma + 1))
    basis = torch.eye(T, dtype=torch.float64)
    ema = PowerEMA({"theta": torch.randn(T, generator=gen, dtype=torch.float64)}, [0.1])  # init is forgotten
    for t in range(T):
        ema.update([basis[t]])
    i = torch.arange(1, T + 1, dtype=torch.float64)
    assert_close(ema.averages[0][0], (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / T ** (gamma + 1),
                 rtol=1e-12, atol=1e-15)
    weights = ema.averages[0][0]
    mean = (weights * (i - 0.5)).sum()  # step t stands for τ in (t−1, t]: its centre, plus the 1/12 within it
    std = ((weights * (i - 0.5 - mean) ** 2).sum() + 1 / 12).sqrt()
    assert float(std) / T == pytest.approx(0.1, rel=2e-3)


def test_classic_decay_to_sigma_rel_matches_the_profile_std():
    """Lightning EMA's own avg_fn (no warm-up) averaging θ_t = t and t²: its profile's moments, std sqrt(β)/(1−β)."""
    T, decay = 20_000, 0.999
    avg_fn = ema_warmup_avg_fn(decay, warmup=False)
    moments = torch.zeros(2, dtype=torch.float64)  # θ_0 = 0: the initial weights, of weight β^T ≈ 2e-9
    for t in range(1, T + 1):
        lag = float(T - t)  # steps before the last: the moments of the lag, whose std is that of the profile
        moments = avg_fn(moments, torch.tensor([lag, lag * lag], dtype=torch.float64), torch.tensor(t))
    std = math.sqrt(moments[1] - moments[0] ** 2)
    assert decay_to_sigma_rel(decay, T) == pytest.approx(std / T, rel=1e-6)
    assert decay_to_sigma_rel(0.9999, 800_000) == pytest.approx(0.0125, rel=1e-3)
    assert sigma_rel_to_decay(decay_to_sigma_rel(decay, T), T) == pytest.approx(decay, rel=1e-14)


def test_foreach_update_equals_a_per_tensor_loop(gen):
    shapes = [(3, 4, 2), (7,), (1,), (5, 5)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    ema = PowerEMA({f"p{i}": p for i, p in enumerate(params)}, SIGMA_RELS)
    loops = [[p.clone() for p in params] for _ in SIGMA_RELS]
    for t in range(1, 31):
        params = [p + 0.1 * torch.randn(p.shape, generator=gen) for p in params]
        ema.update(params)
        for gamma, averages in zip(ema.gammas, loops, strict=True):
            for average, p in zip(averages, params, strict=True):
                average.lerp_(p, 1 - (1 - 1 / t) ** (gamma + 1))
    for mine, theirs in zip(ema.averages, loops, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert ema.step == 30


# Profile inner products and the reconstruction


def test_inner_products_match_quadrature():
    pairs = [(1000, 16.97, 1000, 6.94), (400, 6.94, 1000, 16.97), (1000, 3.0, 250, 50.0), (50, 0.0, 50, 0.0)]
    for ta, ga, tb, gb in pairs:
        n = 2_000_000
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) / n * min(ta, tb)
        integrand = (ga + 1) * tau**ga / ta ** (ga + 1) * (gb + 1) * tau**gb / tb ** (gb + 1)
        expected = float(integrand.sum() * min(ta, tb) / n)
        assert float(profile_inner_products([ta], [ga], [tb], [gb])) == pytest.approx(expected, rel=1e-8)
    gram = profile_inner_products([10, 20, 30], [1.0, 2.0, 3.0], [10, 20, 30], [1.0, 2.0, 3.0])
    assert_close(gram, gram.T, rtol=1e-15, atol=0)


def test_reconstruction_at_a_tracked_sigma_rel_is_the_tracked_average(gen):
    trajectory = random_walk(1000, gen)
    ema, steps, gammas, states = tracked_run(trajectory, every=50)
    for k, gamma in enumerate(ema.gammas):
        weights = solve_weights(steps, gammas, 1000, gamma)
        unit = torch.zeros(len(steps), dtype=torch.float64)
        unit[len(steps) - len(SIGMA_RELS) + k] = 1.0
        assert_close(weights, unit, rtol=0, atol=1e-9)
        assert_close(reconstruct(states, weights), ema.averaged(k), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma_rel", [0.035, 0.07, 0.15])
def test_reconstruction_at_an_untracked_sigma_rel_matches_a_power_ema_tracked_directly(sigma_rel, gen):
    """1,000 random-walk steps, 20 snapshots of each profile; the target tracked by `plain_power_ema`.

    The error is ∫ r(τ) (θ(τ) − θ_T) dτ with r the profile misfit (∫ r = 0 as the weights sum to 1), so by
    Cauchy–Schwarz it is at most fit_error · ‖p*‖ · ‖θ − θ_T‖ per coordinate (seen: under 2% of that bound).
    Stated plainly: within 0.5% of how far apart the two tracked averages lie (seen: 0.16% at most).
    """
    T = 1000
    trajectory = random_walk(T, gen)
    ema, steps, gammas, states = tracked_run(trajectory, every=50)
    gamma = largest_root_gamma(sigma_rel)
    weights = solve_weights(steps, gammas, T, gamma)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)  # a constant trajectory is kept as it is
    rebuilt = reconstruct(states, weights)
    misfit = float(fit_error(steps, gammas, T, gamma, weights))
    assert misfit < 0.03
    norm_p = math.sqrt((gamma + 1) ** 2 / ((2 * gamma + 1) * T))
    spread = {n: (ema.averaged(0)[n] - ema.averaged(1)[n]).abs().max() for n in rebuilt}
    for name, value in rebuilt.items():
        path = torch.stack([theta[name] for theta in trajectory])  # (T, ...)
        direct = plain_power_ema(list(path), gamma)
        bound = misfit * norm_p * ((path - path[-1]) ** 2).sum(0).sqrt()
        assert ((value - direct).abs() <= bound + 1e-12).all(), name
        assert (value - direct).abs().max() <= 0.005 * spread[name], name
        assert (direct - ema.averaged(0)[name]).abs().max() > 0.1 * spread[name]  # a different average indeed


def test_reconstructable_range_grows_with_the_number_of_snapshots():
    def range_for(every: int, T: int = 1200):
        steps = [t for t in range(every, T + 1, every) for _ in SIGMA_RELS]
        return reconstructable_range(steps, [sigma_rel_to_gamma(s) for _ in steps[::2] for s in SIGMA_RELS], T)

    lo12, hi12 = range_for(100)  # the digits recipe: 12 snapshots over its 1,200 steps
    assert 0.025 < lo12 < 0.04 and 0.18 < hi12 < 0.25
    lo40, hi40 = range_for(30)
    assert lo40 < lo12 and hi40 > hi12


# The callback under a real Trainer


class TinyModule(L.LightningModule):
    """A linear `.net` fit to a fixed batch by SGD: deterministic, one batch an epoch, so any stop is resumable."""

    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        self.net[0].register_buffer("calls", torch.zeros(()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)


class Recorder(L.Callback):
    """The net's parameters after every optimizer step, for an EMA computed independently."""

    def __init__(self):
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        self.batch_ends = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_ends += 1
        self.seen[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


def fit(root: Path, max_steps: int, ckpt_path=None, every: int | None = 3, extra=(), batch_size: int = 16,
        num_snapshots: int | None = None, **trainer_kwargs) -> PostHocEMA:
    """num_snapshots: None, the schema's."""
    torch.manual_seed(0)
    snapshots = {} if num_snapshots is None else {"num_snapshots": num_snapshots}
    callback = build(PostHocEMAConfig, sigma_rels=SIGMA_RELS, every_n_steps=every, **snapshots)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(root / "checkpoints", every_n_train_steps=1, save_top_k=0,
                                                     save_last=True)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[callback, checkpoint, *extra], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        accelerator="cpu", **trainer_kwargs)
    trainer.fit(TinyModule(batch_size), ckpt_path=ckpt_path)
    return callback


def snapshot_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "posthoc_ema"))


def test_callback_writes_snapshots_of_power_emas_every_n_steps_and_at_the_end(tmp_path):
    recorder = Recorder()
    fit(tmp_path, max_steps=8, extra=[recorder])
    assert snapshot_files(tmp_path) == [snapshot_name(3), snapshot_name(6), snapshot_name(8)] == \
        ["step_00000003.pt", "step_00000006.pt", "step_00000008.pt"]
    assert sorted(recorder.seen) == list(range(1, 9))
    for step in (3, 6, 8):
        snap = torch.load(tmp_path / "posthoc_ema" / snapshot_name(step), weights_only=True)
        assert snap["step"] == step and snap["sigma_rels"] == list(SIGMA_RELS)
        assert snap["buffers"].keys() == {"0.calls"}
        for k, sigma_rel in enumerate(SIGMA_RELS):
            gamma = largest_root_gamma(sigma_rel)
            for name, value in snap["averages"][k].items():
                direct = plain_power_ema([recorder.seen[t][name].double() for t in range(1, step + 1)], gamma)
                assert_close(value, direct.float(), rtol=1e-5, atol=1e-6)


def test_default_cadence_keeps_num_snapshots_whatever_max_steps(tmp_path):
    """every_n_steps=None: every ceil(max_steps / num_snapshots) steps, plus the last step."""
    for max_steps, num_snapshots, expected in [(8, 3, [3, 6, 8]), (9, 3, [3, 6, 9]), (4, 16, [1, 2, 3, 4])]:
        root = tmp_path / f"{max_steps}_{num_snapshots}"
        callback = fit(root, max_steps=max_steps, every=None, num_snapshots=num_snapshots)
        assert snapshot_files(root) == [snapshot_name(s) for s in expected]
        assert callback.every_n_steps is None and callback.every == -(-max_steps // num_snapshots)


def test_callback_on_the_diffusion_module_gives_weights_its_net_loads(tmp_path):
    """The real DiffusionModule (a tiny U-Net): its snapshots rebuild a state dict that `net` loads strictly."""
    module = diffusion_module({"in_channels": 1, "out_channels": 1, "ch": 8, "ch_mult": [1], "num_res_blocks": 1,
                               "attn_resolutions": [], "dropout": 0.0, "image_size": 8, "num_groups": 4},
                              objective=ddpm(paper_betas(20)), val_bpd_images=0)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    trainer = L.Trainer(max_steps=3, callbacks=[build(PostHocEMAConfig, every_n_steps=2)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, accelerator="cpu", limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(images, batch_size=4))
    assert snapshot_files(tmp_path) == [snapshot_name(2), snapshot_name(3)]
    state, info = load_posthoc_ema(tmp_path / "posthoc_ema", 0.10)
    assert info["step"] == 3
    module.net.load_state_dict(state, strict=True)


def test_callback_updates_once_per_optimizer_step_under_gradient_accumulation(tmp_path, monkeypatch):
    written, real = [], callback_module.write_atomically
    monkeypatch.setattr(callback_module, "write_atomically", lambda data, path: (written.append(path.name),
                                                                               real(data, path)))
    recorder = Recorder()
    callback = fit(tmp_path, max_steps=4, every=2, extra=[recorder], batch_size=8, accumulate_grad_batches=2)
    assert recorder.batch_ends == 8  # two micro-batches a step
    assert callback.ema.step == 4 and snapshot_files(tmp_path) == [snapshot_name(2), snapshot_name(4)]
    assert written == snapshot_files(tmp_path)  # each written once, not again at the next micro-batch
    snap = torch.load(tmp_path / "posthoc_ema" / snapshot_name(4), weights_only=True)
    for name, value in snap["averages"][0].items():
        direct = plain_power_ema([recorder.seen[t][name].double() for t in range(1, 5)], largest_root_gamma(0.05))
        assert_close(value, direct.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stop", [3, 4], ids=["at_a_snapshot", "between_snapshots"])
def test_stop_and_resume_in_another_folder_gives_bit_identical_snapshots(stop, tmp_path):
    fit(tmp_path / "full", max_steps=8)
    fit(tmp_path / "first", max_steps=stop)
    fit(tmp_path / "resumed", max_steps=8, ckpt_path=tmp_path / "first" / "checkpoints" / "last.ckpt")
    full, resumed = snapshot_files(tmp_path / "full"), snapshot_files(tmp_path / "resumed")
    # The resumed folder holds the whole history: the first run's snapshots (its end one too), then its own.
    assert resumed == sorted({*full, snapshot_name(stop)})
    for name in full:
        a, b = (tmp_path / run / "posthoc_ema" / name for run in ("full", "resumed"))
        assert a.read_bytes() == b.read_bytes(), name  # the same file, byte for byte
    ckpt = torch.load(tmp_path / "first" / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("PostHocEMA")]
    assert state["ema"]["step"] == stop


def test_resuming_a_checkpoint_without_posthoc_state_is_a_one_line_error(tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", save_last=True, save_top_k=0)
    L.Trainer(max_steps=2, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(TinyModule())
    with pytest.raises(UserError, match=r"^resuming at step 2 from a checkpoint without post-hoc EMA state") as info:
        fit(tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert "\n" not in str(info.value)


def test_a_failed_write_leaves_only_whole_snapshots(tmp_path, monkeypatch):
    real = files.write_durably  # diffusion.files' durable write, through which the callback's writes go
    calls = []

    def half_then_full_disk(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second snapshot: half of it reaches the disk, then ENOSPC
            with open(path, "wb") as f:
                f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(files, "write_durably", half_then_full_disk)
    with pytest.raises(UserError) as info:
        fit(tmp_path, max_steps=8)
    message = str(info.value)
    assert "\n" not in message and snapshot_name(6) in message and "free space on that disk" in message
    assert snapshot_files(tmp_path) == [snapshot_name(3)]  # no step 6, no temporary file
    assert torch.load(tmp_path / "posthoc_ema" / snapshot_name(3), weights_only=True)["step"] == 3


def test_bad_callback_settings_are_refused_in_one_line(tmp_path):
    """By the config, before anything is built (the callback takes what it is given)."""
    key = "callbacks.posthoc_ema"
    for override, expected in [
            ("every_n_steps=0", rf"{key}.every_n_steps must be null or an integer >= 1, got 0"),
            ("num_snapshots=0", rf"{key}.num_snapshots must be in \[1, 10000\], got 0; try {key}.num_snapshots="),
            ("sigma_rels=[0.05,0.05]", "must be distinct"),
            ("sigma_rels=[]", r"must be distinct widths .*, got \[\]"),
            ("sigma_rels=[0.05,0.5]", rf"{key}.sigma_rels must be distinct widths in \(0, 0.2887\]")]:
        with pytest.raises(UserError, match=expected) as info:
            validate(train_cfg(tmp_path, f"{key}.{override}"))
        assert "\n" not in str(info.value)


# load_posthoc_ema: what evaluation calls


def write_snapshots(folder: Path, trajectory, every: int, sigma_rels=SIGMA_RELS) -> PowerEMA:
    ema = PowerEMA({n: v.float() for n, v in trajectory[0].items()}, sigma_rels)
    for theta in trajectory:
        ema.update([v.float() for v in theta.values()])
        if ema.step % every == 0:
            contents = snapshot_contents(ema, {"buf": torch.ones(2)})
            path = folder / snapshot_name(ema.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(contents, path)
    return ema


def test_load_posthoc_ema_rebuilds_tracked_and_untracked_widths(tmp_path, gen):
    trajectory = random_walk(600, gen)
    ema = write_snapshots(tmp_path, trajectory, every=50)
    state, info = load_posthoc_ema(tmp_path, 0.10)
    assert info["step"] == 600 and info["fit_error"] < 1e-6 and len(info["snapshots"]) == 24
    assert state.keys() == {"w", "b", "scale", "buf"} and state["w"].dtype == torch.float32
    assert_close({n: state[n] for n in ema.names}, ema.averaged(1), rtol=1e-5, atol=1e-5)
    state, info = load_posthoc_ema(str(tmp_path), 0.07)
    direct = plain_power_ema([theta["w"] for theta in trajectory], largest_root_gamma(0.07))
    spread = float((ema.averages[0][0] - ema.averages[1][0]).abs().max())
    assert_close(state["w"].double(), direct, rtol=0, atol=0.005 * spread)
    assert sum(w for _, _, w in info["snapshots"]) == pytest.approx(1.0)
    lo, hi = info["range"]
    assert lo < 0.05 and 0.10 < hi < SIGMA_REL_MAX


def error_of(*args) -> str:
    with pytest.raises(UserError) as info:
        load_posthoc_ema(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_load_posthoc_ema_errors_are_one_line(tmp_path, gen):
    assert "does not exist" in error_of(tmp_path / "nope", 0.1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a snapshot")
    assert "no post-hoc EMA snapshots (step_<step>.pt) in" in error_of(tmp_path / "empty", 0.1)
    folder = tmp_path / "run"
    write_snapshots(folder, random_walk(300, gen), every=50)
    for sigma_rel in (0.001, 0.3, 0.0, -0.1):
        message = error_of(folder, sigma_rel)
        assert f"sigma_rel={sigma_rel} cannot be reconstructed from the 6 snapshots" in message
        assert "at step 300 they allow about [0.0" in message
    bad = torch.load(folder / snapshot_name(100), weights_only=True)
    bad["averages"][1]["w"] = torch.zeros(5, 3)
    torch.save(bad, folder / snapshot_name(100))
    assert "are of different nets: w has shape (4, 3) in step_00000050.pt but (5, 3) in step_00000100.pt" in \
        error_of(folder, 0.1)
    (folder / snapshot_name(100)).write_bytes((folder / snapshot_name(50)).read_bytes()[:300])
    assert f"snapshot {folder / snapshot_name(100)} cannot be read" in error_of(folder, 0.1)


def test_math_entry_points_reject_bad_input_in_one_line():
    for call, expected in [(lambda: sigma_rel_to_gamma(0.3), "sigma_rel must be in"),
                           (lambda: solve_weights([], [], 10, 1.0), "at least one snapshot"),
                           (lambda: solve_weights([10, 10], [1.0, 1.0], 10, 2.0), r"\(10, 1.0\) is given twice"),
                           (lambda: solve_weights([0], [1.0], 10, 2.0), "steps must be >= 1"),
                           (lambda: reconstruct([], []), "no snapshots"),
                           (lambda: reconstruct([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [0.5, 0.5]),
                            "snapshot 1 holds other tensors")]:
        with pytest.raises(UserError, match=expected) as info:
            call()
        assert "\n" not in str(info.value)


def test_power_ema_refuses_the_state_of_other_widths_or_another_net():
    saved = PowerEMA({"w": torch.zeros(3)}, SIGMA_RELS)
    saved.update([torch.ones(3)])
    for other, expected in [(PowerEMA({"w": torch.zeros(3)}, (0.05, 0.2)), r"sigma_rels \(0.05, 0.1\), this run asks"),
                            (PowerEMA({"w": torch.zeros(4)}, SIGMA_RELS), "averages another net")]:
        with pytest.raises(UserError, match=expected) as info:
            other.load_state_dict(saved.state_dict())
        assert "\n" not in str(info.value) and other.step == 0
    same = PowerEMA({"w": torch.zeros(3)}, SIGMA_RELS)
    same.load_state_dict(saved.state_dict())
    assert same.step == 1 and torch.equal(same.averages[1][0], torch.ones(3))


def test_write_atomically_replaces_whole_files(tmp_path):
    path = tmp_path / "deep" / "x.pt"
    write_atomically(b"old", path)
    write_atomically(b"new contents", path)
    assert path.read_bytes() == b"new contents" and os.listdir(path.parent) == ["x.pt"]


def readme_table(header: str) -> list[list[str]]:
    """The rows of the README table whose header line starts with `header`."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            return rows
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_readme_tables_are_what_the_functions_give():
    """The σ_rel ↔ decay table and the range per snapshot count in the README, recomputed."""
    rows = readme_table("| σ_rel | γ | decay at step 1,200")
    assert [r[0] for r in rows] == ["0.01", "0.05", "0.10", "0.20"]
    for sigma_rel, gamma, digits, cifar in rows:
        s = float(sigma_rel)
        assert math.isclose(float(gamma), sigma_rel_to_gamma(s), rel_tol=5e-3)
        assert float(digits) == round(sigma_rel_to_decay(s, 1200), len(digits) - 2)
        assert float(cifar) == round(sigma_rel_to_decay(s, 800_000), len(cifar) - 2)
    gammas = [sigma_rel_to_gamma(s) for s in SIGMA_RELS]
    rows = readme_table("| snapshots | σ_rel from | to |")
    assert [r[0] for r in rows] == ["8", "12", "16", "40", "80"]
    for count, lo, hi in rows:
        every = -(-1200 // int(count))  # the default cadence over the digits run's 1,200 steps
        steps = [*range(every, 1200, every), 1200]
        got = reconstructable_range([t for t in steps for _ in gammas], gammas * len(steps), 1200)
        assert (float(lo), float(hi)) == (round(got[0], 3), round(got[1], 3)), count
