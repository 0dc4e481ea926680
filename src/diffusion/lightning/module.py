"""The LightningModule: glue between the U-Net, an objective (core/objectives), the optimizer and the loggers.

Hyperparameters are plain Python values (the network's arguments and the objective's spec, a dict with its
`_target_`), so a checkpoint loads with `DiffusionModule.load_from_checkpoint(path)` under torch's
`weights_only=True` without any config. The constructor trusts its arguments: the config was validated before.
"""

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics import MeanMetric

from diffusion.core.objectives.base import Objective, build_objective
from diffusion.core.ode_likelihood import ode_bits_per_dim
from diffusion.errors import UserError
from diffusion.nn import UNet

ODE_LEVELS = 100  # val/bpd through the ODE: Heun on 100 levels of the logsnr grid (198 network calls and backwards)


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf."""


class DiffusionModule(L.LightningModule):
    """Training (Ho et al. 2020 Algorithm 1, for any objective) with validation loss at fixed noise levels and
    bits/dim (DDPM: the full bound; the others: the probability-flow ODE)."""

    def __init__(self, net: dict[str, Any], objective: dict[str, Any], val_timestep_fractions: tuple[float, ...],
                 val_bpd_images: int, loss_bins: int, on_nonfinite: str, nonfinite_check_every_n_steps: int,
                 compile: bool, cond_drop_prob: float | None = None, class_names: list[str] | None = None,
                 optimizer: Callable | None = None, lr_scheduler: Callable | None = None):
        super().__init__()
        conditional = net.get("num_classes") is not None
        # An unconditional module saves no label settings.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler",
                                          *(() if conditional else ("cond_drop_prob", "class_names"))])
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.objective: Objective = build_objective(objective)
        self.net = UNet(**net, learned_variance=self.objective.learned_variance)
        self.loss_bins = self.objective.num_bins(loss_bins)
        self.bin_labels = self.objective.bin_labels(self.loss_bins)
        # No sync at compute: each rank already holds the global batch's values (see _log_binned).
        self.train_bin_loss = torch.nn.ModuleList(MeanMetric(sync_on_compute=False) for _ in range(self.loss_bins))
        self.nonfinite_skips = 0
        self._first_nonfinite: tuple[Tensor, Tensor] | None = None  # (step, loss) of the first NaN/inf loss, or -1
        self._step_draw: tuple[Tensor, ...] | None = None  # this optimizer step's (levels, w, ε[, label dropped])

    @property
    def num_classes(self) -> int | None:
        """The label count of a class-conditional model, None for an unconditional one."""
        return self.net.num_classes

    @property
    def cond_drop_prob(self) -> float | None:
        """The share of labels training replaced by "no label" (0: the unconditional pass never learned); None for an
        unconditional model."""
        return self.hparams.get("cond_drop_prob")

    @property
    def class_names(self) -> list[str] | None:
        """The classes' names (index order) when the data named them, else None."""
        return self.hparams.get("class_names")

    def forward(self, x: Tensor, noise_in: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, noise_in, y)

    def _net_given(self, y: Tensor | None) -> Callable[[Tensor, Tensor], Tensor]:
        """The network as a model(x, noise_in) callable, conditioned on labels y when the model takes them."""
        if y is None or self.num_classes is None:
            return self.net
        return lambda x, noise_in: self.net(x, noise_in, y)

    def _split_batch(self, batch) -> tuple[Tensor, Tensor | None]:
        """(x0, labels): a batch is images alone, or (images, labels) for a class-conditional model."""
        if isinstance(batch, Tensor):
            if self.num_classes is not None:
                raise UserError("a class-conditional model (model.num_classes set) got a batch without labels; "
                                "train it with train.py, which asks the data for labels")
            return batch, None
        x0, y = batch
        return x0, y

    def training_step(self, batch, batch_idx: int) -> Tensor:
        # Algorithm 1: a noise level from the objective's distribution, ε ~ N(0, I), a gradient step on its loss.
        x0, y = self._split_batch(batch)
        levels, weights, eps, *dropped = self._draw(x0, batch_idx)
        self.objective.set_step(self.global_step)
        if y is not None:  # classifier-free guidance training: a share of labels replaced by "no label"
            y = torch.where(dropped[0], torch.full_like(y, self.net.null_label), y)
        out = self.objective.loss(self._net_given(y), x0, levels, eps)
        if out.vlb is not None:
            self._update_levels(levels, out.vlb)
        loss = (out.loss * weights).mean()
        if self.hparams.on_nonfinite == "skip":  # skipping a step needs its answer now: one host sync per step
            if not torch.isfinite(loss):
                return self._nonfinite(loss)
        else:
            self._watch_nonfinite(loss)
        # Logged as the mean over ranks: the global batch's loss, comparable across device counts. Not prog_bar:
        # Lightning reads those on the host after every batch; StepProgressBar shows it at the logging cadence.
        if self._logs_this_step():
            self.log("train/loss", loss, sync_dist=True)
            self.log("train/mse", out.mse.mean(), sync_dist=True)
            if out.vlb is not None:
                self.log("train/vlb_bpd_term", out.vlb.mean())
        self._log_binned(levels, out.mse.detach())
        return loss

    def _logs_this_step(self) -> bool:
        """Whether this batch's training scalars are read: at the steps whose metrics Lightning writes to the loggers
        (trainer.log_every_n_steps, Lightning's own test), at an epoch's last batch and at the last step (the bar's
        loss then, and train.py's final metrics).

        self.log costs Lightning's bookkeeping (and, with sync_dist, an all-reduce) at every call; a value logged
        between those steps would only be overwritten unread. Every rank answers the same (the same step counts).
        """
        if self._trainer is None:
            return True
        trainer = self.trainer
        last_step = 0 < trainer.max_steps <= self.global_step + 1
        return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run or last_step
                    or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def _draw(self, x0: Tensor, batch_idx: int) -> tuple[Tensor, ...]:
        """Noise levels, importance weights and ε (and, for a class-conditional model, whether each label is
        dropped) for this rank's images, drawn for the whole optimizer step and sliced.

        Every rank seeds the same RNG and, at the first micro-batch of a step, draws them for all W ranks × A
        accumulated micro-batches × B images; micro-batch k of rank r keeps rows r, r + W, ... of block k: the
        rows its images have in one big batch (`EpochSampler` deals images out the same way). So ranks never share
        noise, and W devices × A micro-batches × B images train exactly as 1 device × W·A·B images (when an
        epoch's batch count is a multiple of A).
        """
        world, rank, accumulate = 1, 0, 1
        if self._trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            accumulate = self.trainer.accumulate_grad_batches
        micro, B = batch_idx % accumulate, x0.shape[0]
        if micro == 0 or self._step_draw is None or self._step_draw[2].shape[0] != world * accumulate * B:
            n = world * accumulate * B
            levels, weights = self.objective.draw_levels(n, x0.device)  # (W·A·B,)
            eps = torch.randn((n, *x0.shape[1:]), device=x0.device, dtype=x0.dtype)  # (W·A·B, C, H, W)
            self._step_draw = (levels, weights, eps)
            if self.num_classes is not None:  # after ε, so an unconditional run draws exactly what it did
                dropped = torch.rand(n, device=x0.device) < self.hparams.cond_drop_prob  # (W·A·B,)
                self._step_draw = (*self._step_draw, dropped)
        rows = slice(micro * world * B + rank, (micro + 1) * world * B, world)
        return tuple(x[rows] for x in self._step_draw)

    def _watch_nonfinite(self, loss: Tensor) -> None:
        """on_nonfinite=stop: note the first NaN/inf loss on the device; read it (a host sync) only every
        `nonfinite_check_every_n_steps` steps and before every checkpoint, and stop if there was one."""
        if self._first_nonfinite is None:
            self._first_nonfinite = (torch.full((), -1, device=loss.device), torch.zeros((), device=loss.device))
        step, value = self._first_nonfinite
        new = torch.logical_and(~torch.isfinite(loss.detach()), step < 0)
        self._first_nonfinite = (torch.where(new, self.global_step, step), torch.where(new, loss.detach(), value))
        if (self.global_step + 1) % self.hparams.nonfinite_check_every_n_steps == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """Stop (NonFiniteLoss) if a NaN/inf loss was noted since the run started."""
        if self._first_nonfinite is not None and int(self._first_nonfinite[0]) >= 0:
            step, value = self._first_nonfinite
            self._nonfinite(value, int(step))

    def _nonfinite(self, loss: Tensor, step: int | None = None) -> None:
        """A NaN/inf loss: skip the step (training.on_nonfinite=skip, counted) or stop before anything is saved."""
        if self.hparams.on_nonfinite == "skip":
            self.nonfinite_skips += 1
            self.log("train/nonfinite_skips", float(self.nonfinite_skips))
            return None  # Lightning skips backward and the optimizer step
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        last = getattr(callback, "last_model_path", "") or "none saved yet"
        step = self.global_step if step is None else step
        raise NonFiniteLoss(f"training loss is {loss.item()} at step {step}; nothing after the last "
                            f"good checkpoint ({last}) was saved; lower optim.optimizer.lr, or set "
                            "training.on_nonfinite=skip to skip such steps")

    def _update_levels(self, levels: Tensor, vlb: Tensor) -> None:
        """Feed every rank's VLB terms to an adaptive level distribution, so all ranks keep the same history."""
        t_all, vlb_all = self.all_gather(levels), self.all_gather(vlb.detach())  # (W, B) under DDP, else (B,)
        # rank-major (W, B) -> the global batch's own order (rows rank, rank + W, ...: see _draw)
        n = levels.shape[0]
        self.objective.update_levels(t_all.reshape(-1, n).T.reshape(-1), vlb_all.reshape(-1, n).T.reshape(-1))

    def _log_binned(self, levels: Tensor, mse: Tensor) -> None:
        """The training error averaged within `loss_bins` equal ranges of the objective's noise level, logged per
        epoch: where schedules and objectives differ."""
        bins = self.loss_bins
        if self._trainer is not None and self.trainer.world_size > 1:
            # Every rank bins the whole global batch (a few floats), so all ranks log the same bins: a bin
            # logged on one rank only would leave the others waiting in its epoch-end sync.
            levels, mse = self.all_gather(levels).reshape(-1), self.all_gather(mse).reshape(-1)
        # sums and counts per bin by index_add_ (no mask.any(): no host sync), added to each bin's MeanMetric state
        which = self.objective.level_bins(levels, bins)  # (N,)
        mse = mse.float()
        sums = torch.zeros(bins, device=mse.device).index_add_(0, which, mse)
        counts = torch.zeros(bins, device=mse.device).index_add_(0, which, torch.ones_like(mse))
        torch._foreach_add_([m.mean_value for m in self.train_bin_loss], list(sums.unbind()))
        torch._foreach_add_([m.weight for m in self.train_bin_loss], list(counts.unbind()))

    def on_train_epoch_end(self) -> None:
        # After the callbacks' hooks (LossByTLog reads loss_by_t first); one host read per epoch.
        for label, value in self.loss_by_t().items():
            self.log(f"train_loss_by_t/{label}", value)
        for metric in self.train_bin_loss:
            metric.reset()

    def loss_by_t(self) -> dict[str, float]:
        """This epoch's mean training error in each bin of noise level that had samples: what is logged as
        train_loss_by_t/* at the epoch's end (read before then: on_train_epoch_end resets the bins after logging)."""
        return {self.bin_labels[k]: float(m.mean_value / m.weight) for k, m in enumerate(self.train_bin_loss)
                if m.weight > 0}

    def validation_step(self, batch, batch_idx: int) -> None:
        # The training error at fixed noise levels with noise fixed by (batch, level), comparable across
        # evaluations. A class-conditional model is scored given the true labels.
        x0, y = self._split_batch(batch)
        model = self._net_given(y)
        gen = torch.Generator(device=x0.device).manual_seed(batch_idx)
        losses = []
        for label, levels in self.objective.validation_levels(self.hparams.val_timestep_fractions, x0.shape[0],
                                                              x0.device):
            eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            mse = self.objective.validation_mse(model, x0, levels, eps).mean()
            self.log(f"val/loss_{label}", mse, batch_size=x0.shape[0])
            losses.append(mse)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x0.shape[0])
        if batch_idx == 0 and self.hparams.val_bpd_images > 0:
            n = self.hparams.val_bpd_images
            self._log_bpd(x0[:n], gen, None if y is None else y[:n])

    def bits_per_dim(self, x0: Tensor, method: str, generator: torch.Generator | None = None,
                     y: Tensor | None = None, ode_levels: int = ODE_LEVELS) -> dict[str, Tensor]:
        """Bits/dim of data x0 by the full bound (DDPM, Ho et al. 2020 Table 2: {"bpd", "prior_bpd" (L_T), "x0_mse"
        (x̂0's squared error over every step)}) or through the probability-flow ODE (every objective: {"bpd"}),
        each (B,)."""
        model = self._net_given(y)
        if method == "bound":
            bound = self.objective.bound_bits_per_dim(model, x0, generator)
            return {"bpd": bound.total_bpd, "prior_bpd": bound.prior_bpd, "x0_mse": bound.x0_mse.mean(1)}
        nll = ode_bits_per_dim(self.objective.denoiser(model, clip=False), x0, ode_levels, generator=generator)
        return {"bpd": nll.bpd}

    def _log_bpd(self, x0: Tensor, gen: torch.Generator, y: Tensor | None = None) -> None:
        """Bits/dim on a small fixed batch: DDPM's full bound (T network evaluations) and its L_T, else the ODE's."""
        T = self.objective.num_levels  # a discrete model's ODE grid holds at most its T trained levels
        levels = ODE_LEVELS if T is None else min(ODE_LEVELS, T)
        bpd = self.bits_per_dim(x0, self.objective.likelihoods[0], gen, y, levels)
        self.log("val/bpd", bpd["bpd"].mean(), prog_bar=True, batch_size=x0.shape[0], sync_dist=True)
        if "prior_bpd" in bpd:
            self.log("val/prior_bpd", bpd["prior_bpd"].mean(), batch_size=x0.shape[0], sync_dist=True)

    def configure_optimizers(self):
        factory = self.optimizer_factory or torch.optim.Adam
        optimizer = factory(params=self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        # Lightning re-seeds every DDP rank from the run's seed when it sets up the process group (after the
        # network was built); doing the same here in every case makes 1 device and N devices draw the same
        # noise from step 0. A resumed run restores its saved RNG state at its first batch (RNGState).
        reset_seed()
        if self.hparams.compile:
            # In place (nn.Module.compile): state_dict keys stay those of the plain net. Here, after the EMA
            # callback copied the module in its setup, so the copy used for sampling is left uncompiled.
            self.net.compile()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.on_nonfinite == "stop":
            self.raise_if_nonfinite()  # never a checkpoint of weights a NaN/inf step has touched
        checkpoint["timestep_sampler"] = self.objective.level_state()
        checkpoint["nonfinite_skips"] = self.nonfinite_skips
        # The epoch's binned losses so far: a run resumed mid-epoch logs the whole epoch's means at its end.
        checkpoint["train_loss_by_t"] = [dict(metric.metric_state) for metric in self.train_bin_loss]
        # What a resume must continue: the same data (run/commands/train.py compares it), the same W&B run.
        identity = getattr(self.trainer.datamodule, "identity", None)
        if identity is not None:
            checkpoint["data"] = identity
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "timestep_sampler" in checkpoint:
            self.objective.load_level_state(checkpoint["timestep_sampler"])
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)
        states = checkpoint.get("train_loss_by_t", [])
        if len(states) == len(self.train_bin_loss):
            for metric, state in zip(self.train_bin_loss, states, strict=True):
                metric.reset()
                metric.merge_state({k: v.to(metric.device) for k, v in state.items()})
