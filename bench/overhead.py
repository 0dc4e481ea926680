"""The framework's overhead: train.py's whole training step against a bare PyTorch loop, in one process.

The full step is what `train.py experiment=<digits|cifar10_ddpm>` runs (Lightning's loop, EMA and post-hoc
EMA, logging to W&B offline, the callbacks at their default cadence), with the sample grids and quality scores
off, measured with the DataLoader, and with the data on the device (the default where it fits).
The bare loop has the same network, batch, loss, clipping, Adam, warm-up and the same
EMA work (one foreach lerp per average: the EMA and post-hoc EMA's two), in plain PyTorch. A callback inside the
run alternates: K Lightning steps, then K bare steps, ...; a run's overhead is the median over its pairs of
(chunk of the run / the bare chunk after it) − 1, so the machine's drift cancels within each pair, and the bench
reports the median of `--repeats` runs (3) with their spread, each data path's runs back to back.

Also: EMA as one foreach lerp against torch's AveragedModel per-tensor update (today's, before this bench), Adam
one tensor at a time / foreach / fused, and the graph breaks of the compiled network (torch._dynamo.explain).

    .venv/bin/python bench/overhead.py [--models digits cifar10] [--repeats 3] [--threads N] [--paths on_device]

Results go to bench/results/<machine>.json under "overhead-<model>-t<threads>" (with --paths of one path:
"overhead-<model>-t<threads>-<path>").
"""

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.compose_cfg: train.py's config
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusion.run.commands.train as train_module  # noqa: E402
from diffusion.lightning.callbacks.ema import ema_update_, ema_warmup_avg_fn  # noqa: E402
from diffusion.nn import UNet  # noqa: E402
from diffusion.run.commands.train import (
    net_kwargs,  # noqa: E402
    train,  # noqa: E402
)
from helpers import compose_cfg  # noqa: E402
from unet_throughput import environment, machine_name, save  # noqa: E402

RECIPES = {  # model -> (train.py overrides, steps per chunk, chunks); CIFAR-10 at a CPU-sized batch
    "digits": (["experiment=digits"], 10, 15),
    "cifar10": (["experiment=cifar10_ddpm", "data.batch_size=8", "trainer.accelerator=cpu",
                 "trainer.limit_val_batches=0"], 2, 3),  # the full bound (T passes per image) is not a step
}
PATHS = {"loader": ["data.on_device=false"], "on_device": ["data.on_device=true"]}  # the data paths measured
QUIET = ["callbacks.samples=null", "callbacks.quality=null", "trainer.enable_progress_bar=true"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """Algorithm 1 in plain PyTorch: the same network, batch size, loss, clipping, Adam, warm-up and EMAs."""

    def __init__(self, module, cfg, images: torch.Tensor, device: torch.device):
        self.net = copy.deepcopy(module.net).to(device).train()
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.optimizer.lr,
                                          betas=tuple(cfg.optim.optimizer.betas), eps=cfg.optim.optimizer.eps)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1e-8,
                                                           total_iters=cfg.optim.lr_scheduler.total_iters)
        self.params = [p for p in self.net.parameters()]
        self.averages = [[p.detach().clone() for p in self.params] for _ in range(3)]  # EMA, post-hoc EMA × 2
        d = module.objective.diffusion
        self.sqrt_ab = d.sqrt_alphas_cumprod.float().to(device)
        self.sqrt_1m_ab = d.sqrt_one_minus_alphas_cumprod.float().to(device)
        self.images, self.batch, self.clip = images.to(device), cfg.data.batch_size, cfg.trainer.gradient_clip_val
        self.T, self.device = d.num_timesteps, device

    def step(self) -> None:
        index = torch.randint(0, len(self.images), (self.batch,), device=self.device)
        x0 = self.images[index].float() / 127.5 - 1  # (B, C, H, W)
        t = torch.randint(0, self.T, (self.batch,), device=self.device)
        eps = torch.randn_like(x0)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps  # Eq. 4
        loss = F.mse_loss(self.net(x_t, t), eps)  # Eq. 14
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for average in self.averages:
                ema_update_(average, self.params, 0.999)


class Interleave(L.Callback):
    """After a warm-up chunk, alternate: `chunk` steps of the run (timed between this hook's calls), then `chunk`
    bare steps; stop the run after `chunks` pairs."""

    def __init__(self, cfg, images: torch.Tensor, chunk: int, chunks: int):
        self.cfg, self.images, self.chunk, self.chunks = cfg, images, chunk, chunks
        self.full, self.bare, self.mark, self.loop = [], [], None, None

    def _bare_chunk(self, device) -> float:
        sync(device)
        start = time.perf_counter()
        for _ in range(self.chunk):
            self.loop.step()
        sync(device)
        return (time.perf_counter() - start) / self.chunk

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, device = trainer.global_step, pl_module.device
        if step % self.chunk or step < self.chunk:
            return
        sync(device)
        if self.loop is None:  # the warm-up chunk: build the bare loop and warm it up too
            self.loop = BareLoop(pl_module, self.cfg, self.images, device)
            self._bare_chunk(device)
        else:
            self.full.append((time.perf_counter() - self.mark) / self.chunk)
            self.bare.append(self._bare_chunk(device))
            trainer.should_stop = len(self.bare) >= self.chunks
        self.mark = time.perf_counter()


def fake_cifar10(root: Path, n: int = 512) -> None:
    """CIFAR-10's python pickles of random images (the bench measures speed, not learning)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n // 5, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0] * len(data)}, f)


def overhead(model: str, extra: list[str], out: Path) -> dict:
    """Median seconds per step of train.py's step and of the bare loop, interleaved in one run."""
    overrides, chunk, chunks = RECIPES[model]
    if model == "cifar10":
        fake_cifar10(out / "data")
        overrides = [*overrides, f"data.root={out / 'data'}", "data.num_workers=0"]
    cfg = compose_cfg("train", [*overrides, *QUIET, *extra], out / "run")
    datamodule = train_module._data(cfg)
    images = datamodule._split("train").images
    probe = Interleave(cfg, images, chunk, chunks)
    start = time.perf_counter()
    train(cfg, extra_callbacks=(probe,))
    full, bare = statistics.median(probe.full), statistics.median(probe.bare)
    # each chunk of the run against the bare chunk right after it: the machine's drift over the run (clock, other
    # jobs) cancels within a pair, which a ratio of the two medians would keep
    pairs = [f / b - 1 for f, b in zip(probe.full, probe.bare, strict=True)]
    return {"overrides": [*overrides, *extra], "chunk_steps": chunk, "full_s": probe.full, "bare_s": probe.bare,
            "full_median_s": full, "bare_median_s": bare, "pair_overheads": pairs,
            "overhead": statistics.median(pairs), "wall_s": time.perf_counter() - start}


def interleaved(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, calls alternating, one untimed call each first."""
    times = {name: [] for name in steps}
    for i in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def update_costs(model: str, repeats: int = 20) -> dict:
    """EMA: foreach lerp vs AveragedModel's per-tensor avg_fn; Adam: one tensor at a time, foreach, fused."""
    cfg = compose_cfg("train", RECIPES[model][0], Path(tempfile.mkdtemp()))
    net = UNet(**net_kwargs(cfg))
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    averaged = torch.optim.swa_utils.AveragedModel(net, avg_fn=ema_warmup_avg_fn(0.9999, True), use_buffers=False)
    averaged.update_parameters(net)  # the first call copies
    copies = [p.detach().clone() for p in params]
    optimizers = {kind: torch.optim.Adam(params, lr=1e-9, **kw) for kind, kw in
                  (("single_tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    ema = interleaved({"per_tensor_avg_fn": lambda: averaged.update_parameters(net),
                       "foreach_lerp": lambda: ema_update_(copies, params, 0.9999)}, repeats)
    adam = interleaved({k: o.step for k, o in optimizers.items()}, repeats)
    return {"ema_s": ema, "ema_foreach_speedup": ema["per_tensor_avg_fn"] / ema["foreach_lerp"],
            "adam_s": adam, "parameters": sum(p.numel() for p in params), "tensors": len(params)}


def graph_breaks(model: str) -> dict:
    """Graph breaks of the network's forward under torch.compile (dynamo's explain: tracing, no code generation)."""
    cfg = compose_cfg("train", RECIPES[model][0], Path(tempfile.mkdtemp()))
    net = UNet(**net_kwargs(cfg))
    x = torch.randn(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    t = torch.randint(0, 1000, (2,))
    torch._dynamo.reset()
    start = time.perf_counter()
    explained = torch._dynamo.explain(net)(x, t)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "break_reasons": [str(r.reason) for r in explained.break_reasons], "trace_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each data path; the median of their overheads")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS), help="data paths to measure")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    for model in args.models:
        record = {"settings": {**vars(args), "model": model}, **environment(device)}
        for kind in args.paths:
            extra = PATHS[kind]
            runs = []
            for i in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(overhead(model, extra, Path(tmp) / f"{kind}{i}"))
            overheads = [r["overhead"] for r in runs]
            record[kind] = {"runs": runs, "overheads": overheads, "overhead": statistics.median(overheads),
                            "spread": max(overheads) - min(overheads),
                            "full_median_s": statistics.median(r["full_median_s"] for r in runs),
                            "bare_median_s": statistics.median(r["bare_median_s"] for r in runs)}
        record["updates"] = update_costs(model)
        record["compile"] = graph_breaks(model)
        print_summary(model, record)
        some = "" if set(args.paths) == set(PATHS) else "-" + "-".join(args.paths)  # beside the full record
        save(machine_name(device), f"overhead-{model}-t{torch.get_num_threads()}{some}", record)


def print_summary(model: str, r: dict) -> None:
    for kind in (k for k in PATHS if k in r):
        o = r[kind]
        print(f"{model:8s} {kind:9s} train.py {o['full_median_s'] * 1e3:8.1f} ms/step  bare "
              f"{o['bare_median_s'] * 1e3:8.1f} ms/step  overhead {o['overhead']:+.1%} (median of "
              f"{len(o['overheads'])} runs: {', '.join(f'{x:+.1%}' for x in o['overheads'])})")
    u = r["updates"]
    print(f"{model:8s} EMA: per-tensor {u['ema_s']['per_tensor_avg_fn'] * 1e3:.2f} ms, foreach "
          f"{u['ema_s']['foreach_lerp'] * 1e3:.2f} ms ({u['ema_foreach_speedup']:.1f}x); Adam "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in u["adam_s"].items()))
    print(f"{model:8s} compile: {r['compile']['graph_breaks']} graph breaks in {r['compile']['graphs']} graph(s)")
    assert all(math.isfinite(r[k]["overhead"]) for k in PATHS if k in r)


if __name__ == "__main__":
    main()
