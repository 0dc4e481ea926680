"""Under DDP: check that every rank holds the same weights (a diverged rank trains a different model silently)."""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def weight_checksums(module: torch.nn.Module) -> torch.Tensor:
    """(2·P,) float64: the sum and the sum of squares of each parameter, computed on its device."""
    sums = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in module.parameters()]
    return torch.cat(sums)


class RanksInSync(L.Callback):
    """Every N steps and at the end of fit: gather each rank's weight checksums and compare them exactly.

    Logs `ddp/ranks_in_sync` (1 or 0) and warns with the first parameter that differs. DDP averages
    gradients and starts every rank from rank 0's weights, so identical ranks stay identical bit for bit;
    a difference means some rank-local state (an op without a sync, a buffer) leaked into the weights.
    """

    def __init__(self, *, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.last_in_sync: bool | None = None

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        sums = trainer.strategy.all_gather(weight_checksums(pl_module))  # (W, 2·P)
        differs = (sums != sums[0]).any(dim=0).reshape(-1, 2).any(dim=1)  # (P,)
        self.last_in_sync = not bool(differs.any())
        for logger in trainer.loggers:
            logger.log_metrics({"ddp/ranks_in_sync": float(self.last_in_sync)}, step=trainer.global_step)
        if self.last_in_sync:
            rank_zero_info(f"ddp: the weights of all {trainer.world_size} ranks agree at step {trainer.global_step}")
        else:
            name = [n for n, _ in pl_module.named_parameters()][int(differs.nonzero()[0])]
            rank_zero_warn(f"ddp: ranks hold different weights at step {trainer.global_step} (first: {name})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)
