"""The training loss binned over t, one row per epoch, as <run>/loss_by_t.csv (what `report.py` overlays).

The module logs `train_loss_by_t/t0000-0099`, ... per epoch (every logger gets them); this file keeps them
beside the run whatever the logger, so a sweep's report needs neither W&B nor its file format. A row holds
the bins that had samples in that epoch (`DiffusionModule.loss_by_t`, read at the epoch's end before
Lightning logs and resets them). The file is rewritten whole (atomically) at each epoch's end; a run resumed
in the same directory keeps the rows up to its checkpoint's step.
"""

import csv
import io
from pathlib import Path

import lightning as L

from diffusion.files import write_file


class LossByTLog(L.Callback):
    """Each epoch's `train_loss_by_t/*` values as a row of <run>/loss_by_t.csv (columns step, t0000-0099, ...)."""

    def __init__(self, filename: str = "loss_by_t.csv"):
        self.filename = filename
        self.rows: list[dict[str, float]] = []
        self.path: Path | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = Path(trainer.default_root_dir) / self.filename
        self.rows = [r for r in read_loss_by_t(self.path) if r["step"] <= trainer.global_step]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        values = pl_module.loss_by_t()
        if values and trainer.is_global_zero:
            self.rows.append({"step": trainer.global_step, **values})
            self._write()

    def _write(self) -> None:
        columns = ["step", *sorted({k for r in self.rows for k in r} - {"step"})]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_file(self.path, text.getvalue())


def read_loss_by_t(path: Path) -> list[dict[str, float]]:
    """The rows of a loss_by_t.csv (empty if there is none): step as int, the bins as float."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""} for r in rows]
