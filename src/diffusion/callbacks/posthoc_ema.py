"""Post-hoc EMA during training (Karras et al. 2024, Sec. 3): two power-function EMAs of `pl_module.net`'s
parameters, saved as snapshots in <run>/posthoc_ema/step_<step>.pt every N steps and at the end.

`diffusion.posthoc_ema.load_posthoc_ema(<run>/posthoc_ema, sigma_rel)` rebuilds the EMA of any width from them.

Disk: a snapshot holds both profiles in float32, 2 × 4 bytes a parameter. The 1.1M-parameter digits net makes
8.8 MB snapshots, 12 of them (106 MB) for its 1,200 steps at the default every_n_steps=100, enough to rebuild
σ_rel in about [0.032, 0.21]. The 35.7M-parameter CIFAR-10 net makes 2 × 4 × 35.7M = 285.6 MB (272 MiB) a
snapshot: its 800,000 steps need a far larger N, e.g. every_n_steps=20_000 for 40 snapshots (11.4 GB) that
rebuild σ_rel in about [0.016, 0.26] (`reconstructable_range`).

Resume: the running averages and their step are in the checkpoint, so a resumed run writes the same bytes as
an uninterrupted one. A run resumed into another run directory first hard-links (or copies) the snapshots it
has already written there, up to the checkpoint's step, so that each run's folder holds the whole history.
"""

import contextlib
import os
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffusion.checkpointing import _write_durably
from diffusion.errors import UserError
from diffusion.posthoc_ema import SNAPSHOT_RE, PowerEMA, sigma_rel_to_gamma, snapshot_contents, snapshot_name


def write_atomically(data: bytes | memoryview, path: Path) -> None:
    """A temporary file beside `path`, written and fsynced (checkpointing's durable write), renamed onto `path`.

    Readers see the old file or the whole new one; a failure leaves no temporary file and raises a one-line error.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(tmp, memoryview(data))
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the file is whole anyway
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        with contextlib.suppress(OSError):  # the write error below is the one to report
            tmp.unlink()
        raise UserError(f"could not write post-hoc EMA snapshot {path} ({err.strerror or err}); no partial file was "
                        f"left; free space or make {path.parent} writable (or set the callback's dirpath), then "
                        "resume from the last checkpoint") from err


class PostHocEMA(L.Callback):
    """Track power EMAs of width `sigma_rels` (EDM2's 0.05 and 0.10) and snapshot them every `every_n_steps`."""

    def __init__(self, sigma_rels: tuple[float, ...] = (0.05, 0.10), every_n_steps: int = 100,
                 dirpath: str | None = None):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise UserError(f"post-hoc EMA every_n_steps must be an integer >= 1, got {every_n_steps!r}; try 100")
        sigma_rels = tuple(float(s) for s in sigma_rels)
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise UserError(f"post-hoc EMA sigma_rels must be distinct and at least one, got {list(sigma_rels)}; "
                            "try [0.05, 0.10]")
        for s in sigma_rels:
            sigma_rel_to_gamma(s)  # a one-line error for a width no power function has
        self.sigma_rels, self.every_n_steps, self.dirpath = sigma_rels, every_n_steps, dirpath
        self.ema: PowerEMA | None = None
        self.snapshots: Path | None = None  # the folder, known once training starts
        self._restored: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here the net is on its device and global_step is restored (load_state_dict may run before either).
        self.snapshots = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "posthoc_ema"
        restored, self._restored = self._restored, None
        if self.ema is None or restored:  # (a second fit() of the same Trainer goes on with its averages)
            self.ema = PowerEMA(dict(pl_module.net.named_parameters()), self.sigma_rels)
        if restored:
            self.ema.load_state_dict(restored["ema"])
        if self.ema.step != trainer.global_step:
            raise UserError(f"resuming at step {trainer.global_step} from a checkpoint without post-hoc EMA state "
                            f"(it has step {self.ema.step}); power EMAs average from step 0, so train without the "
                            "PostHocEMA callback or start the run again with it")
        if restored and trainer.is_global_zero:
            adopt_snapshots(Path(restored["dirpath"]), self.snapshots, self.ema.step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.ema is None or self.ema.step >= trainer.global_step:
            return  # an accumulating micro-batch: no optimizer step yet
        params = list(pl_module.net.parameters())
        while self.ema.step < trainer.global_step:  # one update per optimizer step (skipped steps: θ unchanged)
            self.ema.update(params)
        if self.ema.step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is not None and self.ema.step > 0 and self.ema.step % self.every_n_steps != 0:
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
