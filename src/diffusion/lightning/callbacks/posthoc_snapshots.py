"""Post-hoc EMA during training (Karras et al. 2024, Sec. 3): two power-function EMAs of `pl_module.net`'s
parameters, saved as snapshots in <run>/posthoc_ema/step_<step>.pt every N steps and at the end.

`diffusion.core.posthoc_ema.load_posthoc_ema(<run>/posthoc_ema, sigma_rel)` rebuilds the EMA of any width from them.

Cadence: every_n_steps, or by default max_steps / num_snapshots rounded up, so that a run keeps a bounded
number of snapshots whatever its length; the σ_rel range they rebuild depends on that number only
(`reconstructable_range`: 8 snapshots about [0.037, 0.17], 12 [0.032, 0.21], 16 [0.028, 0.23], 80 [0.009, 0.27]).

Disk: a snapshot holds both profiles in float32, 2 × 4 bytes a parameter. The 1.1M-parameter digits net makes
8.9 MB snapshots (12 of them, 107 MB, in the digits recipe). The 35.7M-parameter CIFAR-10 net makes
2 × 4 × 35,746,307 B = 286 MB (273 MiB) a snapshot; its recipe sets every_n_steps=10_000: 80 snapshots, 22.9 GB,
whose range includes σ_rel 0.0125, the paper's decay 0.9999 at step 800,000.

Resume: the running averages and their step are in the checkpoint, so a resumed run writes the same bytes as
an uninterrupted one. A run resumed into another run directory first hard-links (or copies) the snapshots it
has already written there, up to the checkpoint's step, so that each run's folder holds the whole history.
"""

import math
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffusion.core.posthoc_ema import SNAPSHOT_RE, PowerEMA, snapshot_contents, snapshot_name
from diffusion.errors import UserError
from diffusion.files import write_file


def write_atomically(data: bytes | memoryview, path: Path) -> None:
    """A temporary file beside `path`, written and fsynced (checkpointing's durable write), renamed onto `path`.

    Readers see the old file or the whole new one; a failure leaves no temporary file and raises a one-line error.
    """
    write_file(path, data, durable=True)


class PostHocEMA(L.Callback):
    """Track power EMAs of width `sigma_rels` (EDM2's 0.05 and 0.10) and snapshot them every `every_n_steps`
    (None: every max_steps / num_snapshots steps, rounded up) and at the end."""

    def __init__(self, *, sigma_rels: tuple[float, ...] | list[float], every_n_steps: int | None, num_snapshots: int,
                 dirpath: str | None):
        """A validated config's values (config/validation.py: distinct widths a power function has, cadences >= 1)."""
        sigma_rels = tuple(float(s) for s in sigma_rels)
        self.sigma_rels, self.every_n_steps, self.num_snapshots = sigma_rels, every_n_steps, num_snapshots
        self.dirpath = dirpath
        self.every = every_n_steps  # the cadence in use: every_n_steps, or derived from max_steps at the start
        self.ema: PowerEMA | None = None
        self.snapshots: Path | None = None  # the folder, known once training starts
        self._restored: dict[str, Any] | None = None
        self._params: list[torch.Tensor] | None = None  # the net's parameters, listed once per fit

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here the net is on its device and global_step is restored (load_state_dict may run before either).
        self._params = None
        self.snapshots = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "posthoc_ema"
        if self.every_n_steps is None:
            if trainer.max_steps is None or trainer.max_steps < 1:
                raise UserError(f"post-hoc EMA derives its cadence from trainer.max_steps, got {trainer.max_steps}; "
                                "set callbacks.posthoc_ema.every_n_steps=N or trainer.max_steps")
            self.every = math.ceil(trainer.max_steps / self.num_snapshots)
        restored, self._restored = self._restored, None
        if self.ema is None or restored:  # (a second fit() of the same Trainer goes on with its averages)
            self.ema = PowerEMA(dict(pl_module.net.named_parameters()), self.sigma_rels)
        if restored:
            self.ema.load_state_dict(restored["ema"])
        if self.ema.step != trainer.global_step:
            raise UserError(f"resuming at step {trainer.global_step} from a checkpoint without post-hoc EMA state "
                            f"(it has step {self.ema.step}); power EMAs average from step 0, so train without the "
                            "PostHocEMA callback (callbacks.posthoc_ema=null) or start the run again with it")
        if restored and trainer.is_global_zero:
            adopt_snapshots(Path(restored["dirpath"]), self.snapshots, self.ema.step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is None or self.ema.step >= trainer.global_step:
            return  # an accumulating micro-batch: no optimizer step yet
        if self._params is None:  # the same tensors all through a fit
            self._params = list(pl_module.net.parameters())
        params = self._params
        while self.ema.step < trainer.global_step:  # one update per optimizer step (skipped steps: θ unchanged)
            self.ema.update(params)
        if self.ema.step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and self.ema.step > 0 and self.ema.step % self.every != 0:
            self._save(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None or self.snapshots is None:  # before training started: what was restored, if anything
            return dict(self._restored or {})
        return {"ema": self.ema.state_dict(), "dirpath": str(self.snapshots.resolve())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            buffer = BytesIO()
            torch.save(snapshot_contents(self.ema, dict(pl_module.net.named_buffers())), buffer)
            write_atomically(buffer.getbuffer(), self.snapshots / snapshot_name(self.ema.step))


def adopt_snapshots(previous: Path, here: Path, step: int) -> None:
    """Hard-link (else copy) into `here` the snapshots up to `step` that a resumed run wrote in `previous`."""
    if previous.resolve() == here.resolve():
        return
    if not previous.is_dir():
        rank_zero_warn(f"the post-hoc EMA snapshots of the resumed run are no longer in {previous}; {here} gets only "
                       f"those after step {step}, which narrows the range of sigma_rel they can rebuild")
        return
    here.mkdir(parents=True, exist_ok=True)
    for path in sorted(previous.iterdir()):
        m = SNAPSHOT_RE.fullmatch(path.name)
        if m and int(m.group(1)) <= step and not (here / path.name).exists():
            try:
                os.link(path, here / path.name)  # atomic: the name appears with the whole file
            except OSError:
                write_atomically(path.read_bytes(), here / path.name)
