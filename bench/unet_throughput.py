"""Throughput of our CIFAR-10 U-Net against diffusers' UNet2DModel built as the same network.

Training step = forward + MSE loss + backward + Adam step; sampling step = forward under inference_mode.
Both models get the same batch, the same optimizer and the same settings; timings alternate between the
models (ours, diffusers, ours, ...) after untimed warm-up steps, and medians are reported. The row
"diffusers+channels_last" is diffusers with the memory-format change a user could make by hand.

    .venv/bin/python bench/unet_throughput.py [--batch 32] [--repeats 5] [--device cpu] [--bf16] [--compile]

Results go to bench/results/<machine>.json, one entry per precision/compile/batch/threads setting.
"""

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from diffusion.nn import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import model_kwargs  # noqa: E402  conf/model/cifar10.yaml's network, as train.py builds it

RESULTS = Path(__file__).resolve().parent / "results"


def diffusers_cifar10(dropout: float) -> UNet2DModel:
    """diffusers' UNet2DModel with the architecture of google/ddpm-cifar10-32 (Ho et al. 2020)."""
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=dropout,
        norm_num_groups=32, norm_eps=1e-6, attention_head_dim=None, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, act_fn="silu", time_embedding_type="positional",
    )  # fmt: skip


def num_params(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() as fallback)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown-cpu"


def machine_name(device: torch.device) -> str:
    """File-name slug of the machine: the GPU's name, or cpu-<model>-<cores>c."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model_name()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory layout, as a user would prepare diffusers' input by hand."""
    return x.contiguous(memory_format=torch.channels_last)


def make_models(dropout: float, device: torch.device) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (module, forward(net, x, t) -> eps); every module freshly initialised."""
    torch.manual_seed(0)
    # ours as conf/model/cifar10.yaml builds it: NHWC inside the model (model.channels_last=true)
    ours = UNet(**{**model_kwargs("data=cifar10"), "dropout": dropout, "channels_last": True}).to(device)
    theirs = diffusers_cifar10(dropout).to(device)
    count_ours, count_theirs = num_params(ours), num_params(theirs)
    print(f"parameters: ours {count_ours:,}  diffusers {count_theirs:,}")
    if abs(count_ours - count_theirs) > 1e-3 * count_theirs:
        raise SystemExit(f"parameter counts differ by more than 0.1%: {count_ours:,} vs {count_theirs:,}")
    return {
        "ours": (ours, lambda net, x, t: net(x, t)),
        "diffusers": (theirs, lambda net, x, t: net(x, t, return_dict=False)[0]),
        "diffusers+channels_last": (
            copy.deepcopy(theirs).to(memory_format=torch.channels_last),
            lambda net, x, t: net(to_channels_last(x), t, return_dict=False)[0],
        ),
    }


def make_step(mode: str, module, net, forward, batch, autocast) -> Callable[[], None]:
    """A training step (MSE to eps, backward, Adam) or a sampling step (forward under inference_mode).

    `net` is `module` itself or its torch.compile'd wrapper.
    """
    x, t, eps = batch
    module.train(mode == "train")
    if mode == "sample":

        def sample_step():
            with torch.inference_mode(), autocast():
                forward(net, x, t)

        return sample_step
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.mse_loss(forward(net, x, t).float(), eps)
        loss.backward()
        optimizer.step()

    return train_step


def time_interleaved(steps: dict[str, Callable], repeats: int, warmup: int, device) -> dict[str, list]:
    """Seconds per call of each step, calls alternating between the steps, warm-up calls not timed."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def run(args) -> dict:
    """Build the models, time training then sampling steps, and return the numbers."""
    device = torch.device(args.device)
    models = make_models(args.dropout, device)
    if not args.diffusers_channels_last:
        models.pop("diffusers+channels_last")
    gen = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(args.batch, 3, 32, 32, generator=gen).to(device) for _ in range(2))
    t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    nets = {name: torch.compile(m) if args.compile else m for name, (m, _) in models.items()}

    def autocast():
        return torch.autocast(device.type, torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    results = {}
    for mode in ("train", "sample"):
        steps = {name: make_step(mode, m, nets[name], fwd, (x, t, eps), autocast) for name, (m, fwd) in models.items()}
        results[mode] = summarize(time_interleaved(steps, args.repeats, args.warmup, device), args.batch)
    return {"parameters": {name: num_params(m) for name, (m, _) in models.items()}, "results": results}


def summarize(times: dict[str, list], batch: int) -> dict:
    """Median images/s per model and the ratio of ours to every other model."""
    out = {name: {"seconds": ts, "median_s": statistics.median(ts)} for name, ts in times.items()}
    for row in out.values():
        row["img_per_s"] = batch / row["median_s"]
    for name, row in out.items():
        if name != "ours":
            row["ours_over_this"] = out["ours"]["img_per_s"] / row["img_per_s"]
    return out


def print_table(results: dict, batch: int) -> None:
    """Print img/s and ratios, one row per model and mode."""
    print(f"{'mode':8s} {'model':26s} {'img/s':>9s} {'median s/step':>14s} {'ours / this':>12s}")
    for mode, rows in results.items():
        for name, row in rows.items():
            ratio = f"{row['ours_over_this']:.2f}x" if "ours_over_this" in row else ""
            print(f"{mode:8s} {name:26s} {row['img_per_s']:9.2f} {row['median_s']:14.3f} {ratio:>12s}")


def environment(device: torch.device) -> dict:
    """Machine and library versions stored with the numbers."""
    return {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15min": os.getloadavg(),
    }


def parse_args() -> argparse.Namespace:
    """Command-line flags; batch and repeats default by device."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per model; default 20 GPU, 5 CPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model; default 5 GPU, 1 CPU")
    p.add_argument("--bf16", action="store_true", help="run both models under bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--dropout", type=float, default=0.1, help="the paper's CIFAR-10 dropout")
    p.add_argument("--no-diffusers-channels-last", dest="diffusers_channels_last", action="store_false",
                   help="skip the extra diffusers+channels_last row")  # fmt: skip
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (128 if gpu else 32)
    args.repeats = args.repeats or (20 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start, load_before = time.perf_counter(), os.getloadavg()
    measured = run(args)
    print_table(measured["results"], args.batch)
    run_record = {"settings": vars(args), **environment(device), **measured}
    run_record["load_average_before"] = load_before  # other processes on the machine skew the numbers
    run_record["wall_s"] = time.perf_counter() - start
    save(machine_name(device), run_tag(args), run_record)


def run_tag(args) -> str:
    """Key of a run in the machine's file: precision, compilation, batch and threads."""
    precision = "bf16" if args.bf16 else "fp32"
    return f"{precision}-{'compile' if args.compile else 'eager'}-b{args.batch}-t{torch.get_num_threads()}"


def save(machine: str, tag: str, run_record: dict) -> None:
    """Write the run into bench/results/<machine>.json, keeping the other settings' runs already there."""
    path = RESULTS / f"{machine}.json"
    record = json.loads(path.read_text()) if path.exists() else {"machine": machine, "runs": {}}
    record["runs"][tag] = run_record
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {tag} to {path}")


if __name__ == "__main__":
    main()
