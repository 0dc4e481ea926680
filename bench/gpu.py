"""The GPU bench behind bench/gpu.sh: what one accelerator does with the paper's networks, in one run.

1. Training img/s of our CIFAR-10 U-Net and diffusers' UNet2DModel built as the same network, batch 128, bf16
   autocast, eager and torch.compile, NCHW and channels_last (interleaved; GroupNorm may make NHWC slower).
2. Our whole train.py step (experiment=cifar10_ddpm, data.on_device=true, bf16-mixed, training.compile=true) in
   img/s, timed between steps inside the run, on random CIFAR-10-shaped data.
3. Sampling img/s (one network evaluation of a batch under inference_mode, bf16) of both networks.
4. Peak memory of one training step of the 256×256 U-Net (model=unet256) at the paper's batch per device:
   64 over a TPU v3-8's 8 cores = 8, and 64 (one GPU doing the whole batch).

`--smoke` runs every part on CPU in seconds (tiny batches and networks, compile through dynamo's eager
backend) so the suite tests the script; its numbers mean nothing and go to --out, not bench/results/.

    bench/gpu.sh [--smoke] [--out FILE]   ->  bench/results/<gpu>.json
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import lightning as L  # noqa: E402

from diffusion.formats.diffusers_unet import unet_config_from_kwargs  # noqa: E402
from diffusion.nn import UNet  # noqa: E402
from diffusion.run.commands.train import train  # noqa: E402
from helpers import compose_cfg, model_kwargs  # noqa: E402
from overhead import fake_cifar10, sync  # noqa: E402
from unet_throughput import RESULTS, environment, machine_name, make_step, time_interleaved  # noqa: E402


def networks(kwargs: dict, device, channels_last: bool) -> dict:
    """ours and diffusers' identical network, both NHWC or both NCHW, as name -> (module, forward)."""
    torch.manual_seed(0)
    ours = UNet(**{**kwargs, "channels_last": channels_last}).to(device)
    config = {k: v for k, v in unet_config_from_kwargs({**kwargs, "channels_last": False}, False).items()
              if not k.startswith("_")}
    theirs = UNet2DModel(**config).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    theirs = theirs.to(memory_format=fmt)
    return {"ours": (ours, lambda net, x, t: net(x, t)),
            "diffusers": (theirs, lambda net, x, t: net(x.contiguous(memory_format=fmt), t, return_dict=False)[0])}


def throughput(args, device, kwargs: dict) -> dict:
    """img/s of training and sampling steps, ours vs diffusers, for each compile × memory-format setting."""
    gen = torch.Generator().manual_seed(0)
    size, channels = kwargs["image_size"], kwargs["in_channels"]
    x, eps = (torch.randn(args.batch, channels, size, size, generator=gen).to(device) for _ in range(2))
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)

    def autocast():
        return torch.autocast(device.type, torch.bfloat16)

    out = {}
    for compiled in (False, True):
        for channels_last in (False, True):
            models = networks(kwargs, device, channels_last)
            start = time.perf_counter()
            nets = {n: torch.compile(m, backend=args.backend) if compiled else m for n, (m, _) in models.items()}
            row = {}
            for mode in ("train", "sample"):
                steps = {n: make_step(mode, m, nets[n], f, (x, t, eps), autocast) for n, (m, f) in models.items()}
                times = time_interleaved(steps, args.repeats, args.warmup, device)
                row[mode] = {n: args.batch / statistics.median(ts) for n, ts in times.items()}
                row[mode]["ours_over_diffusers"] = row[mode]["ours"] / row[mode]["diffusers"]
            row["wall_s_with_compile"] = time.perf_counter() - start
            key = f"{'compile' if compiled else 'eager'}-{'channels_last' if channels_last else 'nchw'}"
            out[key] = row
            print(f"{key:22s} train img/s ours {row['train']['ours']:9.1f} diffusers {row['train']['diffusers']:9.1f}"
                  f" ({row['train']['ours_over_diffusers']:.2f}x); sample img/s ours {row['sample']['ours']:9.1f}",
                  flush=True)
    return out


class StepTimer(L.Callback):
    """Seconds per step between global steps `skip` and `skip + steps`, then stop the run."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.start, self.seconds = skip, steps, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.skip:
            sync(pl_module.device)
            self.start = time.perf_counter()
        elif trainer.global_step == self.skip + self.steps:
            sync(pl_module.device)
            self.seconds = (time.perf_counter() - self.start) / self.steps
            trainer.should_stop = True


def train_py_step(args, device) -> dict:
    """img/s of train.py's whole step with the data on the device (compile's first steps are skipped)."""
    with tempfile.TemporaryDirectory() as tmp:
        fake_cifar10(Path(tmp) / "data", n=2560)
        overrides = ["experiment=cifar10_ddpm", f"data.root={tmp}/data", "data.on_device=true", "logger=none",
                     f"data.batch_size={args.batch}", "callbacks.samples=null", "callbacks.quality=null",
                     "trainer.enable_progress_bar=false", f"trainer.accelerator={device.type}"]
        if device.type == "cuda":
            overrides += ["trainer.precision=bf16-mixed", "training.compile=true"]
        if args.smoke:
            overrides += ["model.ch=32", "data.batch_size=2", "schedule.num_timesteps=20", "data.num_workers=0",
                          "training.max_prior_bpd=null"]  # T=20 of the paper betas ends short of noise: a timing only
        timer = StepTimer(args.train_skip, args.train_steps)
        start = time.perf_counter()
        train(compose_cfg("train", overrides, Path(tmp) / "run"), extra_callbacks=(timer,))
    batch = 2 if args.smoke else args.batch
    return {"overrides": overrides, "s_per_step": timer.seconds, "img_per_s": batch / timer.seconds,
            "wall_s": time.perf_counter() - start}


def peak_memory(args, device) -> dict:
    """Peak allocated memory of one bf16 training step of the 256×256 U-Net, per batch size."""
    kwargs = model_kwargs("experiment=lsun_church_256", "data.root=.")
    if args.smoke:
        kwargs = {**kwargs, "ch": 8, "image_size": 32, "num_groups": 8}
    out = {}
    for batch in (1,) if args.smoke else (8, 64):
        net = UNet(**kwargs).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-5)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        size = kwargs["image_size"]
        x = torch.randn(batch, 3, size, size, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        for _ in range(2):  # the second step holds Adam's state too
            with torch.autocast(device.type, torch.bfloat16):
                loss = net(x, t).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out[f"batch_{batch}"] = {"peak_gib": peak, "parameters": sum(p.numel() for p in net.parameters())}
        print(f"unet256 batch {batch}: peak {peak if peak is None else round(peak, 2)} GiB", flush=True)
        del net, optimizer
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every part on CPU in seconds (the suite's check)")
    p.add_argument("--out", default=None, help="the JSON file (default bench/results/<gpu>.json)")
    args = p.parse_args()
    args.batch, args.repeats, args.warmup = (2, 1, 1) if args.smoke else (128, 20, 5)
    args.backend = "eager" if args.smoke else "inductor"
    args.train_skip, args.train_steps = (1, 2) if args.smoke else (30, 100)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    kwargs = model_kwargs("data=cifar10")
    if args.smoke:
        kwargs = {**kwargs, "ch": 32, "ch_mult": [1, 2], "image_size": 8, "attn_resolutions": [4], "num_groups": 8}
    record = {"settings": vars(args), **environment(device)}
    record[f"throughput_b{args.batch}_bf16"] = throughput(args, device, kwargs)
    record["train_py_on_device"] = train_py_step(args, device)
    print(f"train.py data.on_device=true: {record['train_py_on_device']['img_per_s']:.1f} img/s", flush=True)
    record["peak_memory_unet256"] = peak_memory(args, device)
    record["wall_s"] = time.perf_counter() - start
    path = Path(args.out) if args.out else RESULTS / f"{machine_name(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path} in {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
