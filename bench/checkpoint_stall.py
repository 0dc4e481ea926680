"""How long a checkpoint stalls the training step: background writes (training.async_checkpoints=true, the
default) against synchronous ones, for the paper's CIFAR-10 model (35.7M parameters).

Runs `train.py experiment=cifar10_ddpm` (random CIFAR-10-shaped images, a CPU-sized batch) writing last.ckpt
every `--every` steps (4: room for the write to end before the next one is asked for, as with any realistic
cadence; with a checkpoint after every step a writer slower than the step is a queue that blocks whatever the
method), once per mode, and times what the training thread waits for per checkpoint: the whole
`trainer.save_checkpoint` call (the checkpoint dict built, then written; for background writes the small
tensors copied and the write queued) plus, for background writes, each wait for the writer's thread to finish
copying the large tensors (`settle()`, before the next optimizer step). Also the mean step time of each run,
beside a run without checkpoints, and the checkpoint's size. The first save of a run is left out (it allocates
what later ones reuse); the median of the others is reported. Target: blocked <= 10% of a synchronous write.

    .venv/bin/python bench/checkpoint_stall.py [--saves 5] [--every 4] [--device cpu|cuda] [--dir DIR]

Results go to bench/results/<machine>.json under "checkpoint-stall-cifar10-<device>".
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.compose_cfg: train.py's config
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion.run.commands.train import train  # noqa: E402
from helpers import compose_cfg  # noqa: E402
from overhead import fake_cifar10  # noqa: E402
from unet_throughput import environment, machine_name, save  # noqa: E402


class SaveTimer(L.Callback):
    """Times each trainer.save_checkpoint call (what the step waits for) and each whole step."""

    def __init__(self):
        self.blocked, self.dump, self.steps, self._start = [], [], [], None

    def setup(self, trainer, pl_module, stage) -> None:
        save_checkpoint = trainer.save_checkpoint

        def timed(*args, **kwargs):
            start = time.perf_counter()
            save_checkpoint(*args, **kwargs)
            self.blocked.append(time.perf_counter() - start)

        trainer.save_checkpoint = timed
        io = trainer.strategy.checkpoint_io
        if hasattr(io, "settle"):  # background writes: the step also waits here for the large tensors' copy
            settle = io.settle

            def timed_settle():
                start = time.perf_counter()
                settle()
                if self.blocked:
                    self.blocked[-1] += time.perf_counter() - start

            io.settle = timed_settle
        connector = trainer._checkpoint_connector  # the dict's assembly, the part of the stall both modes share
        dump_checkpoint = connector.dump_checkpoint

        def timed_dump(*args, **kwargs):
            start = time.perf_counter()
            checkpoint = dump_checkpoint(*args, **kwargs)
            self.dump.append(time.perf_counter() - start)
            return checkpoint

        connector.dump_checkpoint = timed_dump

    def on_train_batch_start(self, trainer, *args) -> None:  # a step: from one batch's start to the next's
        now = time.perf_counter()
        if self._start is not None:
            self.steps.append(now - self._start)
        self._start = now


def run(mode: str, saves: int, every: int, device: str, folder: Path) -> dict:
    """One train.py run of saves × every steps with a checkpoint every `every` steps; the save and step times."""
    checkpoints = ["callbacks.checkpoint=null"] if mode == "none" else [
        f"callbacks.checkpoint.every_n_train_steps={every}", "callbacks.checkpoint.save_top_k=0",
        f"training.async_checkpoints={mode == 'async'}"]
    overrides = ["experiment=cifar10_ddpm", "data.batch_size=2", f"data.root={folder / 'data'}", "data.num_workers=0",
                 f"trainer.accelerator={device}", "trainer.limit_val_batches=0", f"trainer.max_steps={saves * every}",
                 "trainer.enable_progress_bar=false", "logger=none", "callbacks.samples=null", "callbacks.quality=null",
                 "callbacks.figures=null", *checkpoints]
    out = folder / mode
    timer = SaveTimer()
    start = time.perf_counter()
    train(compose_cfg("train", overrides, out), extra_callbacks=(timer,))
    wall = time.perf_counter() - start
    steps = {"overrides": overrides, "step_s": timer.steps, "step_mean_s": statistics.mean(timer.steps[1:]),
             "wall_s": wall}
    if mode == "none":
        return steps
    return {**steps, "blocked_s": timer.blocked, "blocked_median_s": statistics.median(timer.blocked[1:]),
            "dump_s": timer.dump, "dump_median_s": statistics.median(timer.dump[1:]),
            "checkpoint_bytes": (out / "checkpoints" / "last.ckpt").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--every", type=int, default=4, help="steps between checkpoints")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        fake_cifar10(folder / "data")
        results = {mode: run(mode, args.saves, args.every, args.device, folder) for mode in ("none", "sync", "async")}
    sync_s, async_s = results["sync"]["blocked_median_s"], results["async"]["blocked_median_s"]
    record = {"model": "cifar10 (35.7M)", "saves": args.saves, "every": args.every, **results,
              "blocked_ratio": async_s / sync_s, "target_ratio": 0.10,
              "environment": environment(torch.device(args.device))}
    gb = results["sync"]["checkpoint_bytes"] / 1e9
    dump_ms = results["async"]["dump_median_s"] * 1e3
    print(f"checkpoint {gb:.2f} GB; step blocked per checkpoint: synchronous {sync_s * 1e3:.0f} ms, "
          f"background {async_s * 1e3:.0f} ms ({async_s / sync_s:.1%} of synchronous; target <= 10%; of it "
          f"{dump_ms:.0f} ms building the checkpoint dict, the rest copying tensors or waiting for their copy); "
          f"mean step with a checkpoint every {args.every}: {results['sync']['step_mean_s']:.2f} s synchronous, "
          f"{results['async']['step_mean_s']:.2f} s background, {results['none']['step_mean_s']:.2f} s "
          "without checkpoints")
    save(machine_name(torch.device(args.device)), f"checkpoint-stall-cifar10-{args.device}", record)


if __name__ == "__main__":
    main()
