"""What every objective provides, so that the LightningModule, the samplers and the likelihood need no other.

An objective owns its noise-level distribution (what training draws), the network's preconditioning (what it is
given and what it predicts), the training target and loss weighting, and the denoiser D(x; σ) -> x̂0 it exposes
(core/denoiser.py). The network is any `model(x_in, noise_in[, y])`; the objective decides both inputs.

A new objective is one module here and one YAML in conf/objective/: the module holds the Objective subclass and
its schema (a subclass of ObjectiveConfig: the settings, their defaults and rules, written once), which the config
layer finds and registers as base_objective_<name>; the YAML names that schema.
"""

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.core.denoiser import Denoiser, Grid
from diffusion.errors import UserError
from diffusion.rules import REQUIRED

Model = Callable[[Tensor, Tensor], Tensor]  # model(x_in, noise_in) -> network output


@dataclass
class ObjectiveConfig:
    """The schema an objective's module declares beside it (`_target_` names the Objective subclass; the fields are
    its constructor's settings, each `checked(default, rule)`)."""

    _target_: str = REQUIRED


@dataclass
class LossOutput:
    """The per-image training loss and its parts (for logging binned over the noise level)."""

    loss: Tensor  # (B,) what is optimised
    mse: Tensor  # (B,) the squared error of the network's target, unweighted (logged as train/mse, binned)
    vlb: Tensor | None = None  # (B,) DDPM's L_t in bits/dim, when the loss needs it (importance sampling reads it)


class Objective(nn.Module):
    """Base class: subclasses set the class attributes and implement the methods below.

    Tensors it keeps (DDPM's schedule coefficients) are non-persistent buffers: a checkpoint rebuilds them from
    `spec()`, the plain values the objective was made from."""

    name: str = ""  # as in conf/objective/<name>.yaml, messages and protocols
    markov_chain: bool = False  # ancestral samplers (Ho et al.'s Algorithm 2, respacing) need a discrete chain
    spacings: tuple[str, ...] = ()  # the grids of noise levels it offers samplers
    learned_variance: bool = False  # the network also predicts a variance (its output channels doubled)
    num_levels: int | None = None  # trained noise levels (DDPM's T), None for a continuous objective
    likelihoods: tuple[str, ...] = ("ode",)  # how bits/dim can be computed: "bound" (DDPM's Eq. 5), "ode"
    default_sampler: str = "euler"  # what a sampler spec without a name draws with
    identity: tuple[str, ...] = ()  # settings that give the network's weights their meaning (resume, init_from)

    def spec(self) -> dict[str, Any]:
        """Plain values that rebuild this objective with `build_objective` (stored in checkpoints)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **self.settings()}

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------------------
    def draw_levels(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """n training noise levels (in the objective's own unit) and their importance weights (B,)."""
        raise NotImplementedError

    def loss(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> LossOutput:
        """The per-image training loss at these noise levels and noise."""
        raise NotImplementedError

    def set_step(self, step: int) -> None:
        """The optimizer step about to be taken, for an objective whose loss follows a curriculum (consistency
        tuning's shrinking Δσ); nothing by default."""

    def update_levels(self, levels: Tensor, vlb: Tensor) -> None:
        """Feedback for an adaptive level distribution (DDPM's importance sampling); nothing by default."""

    def level_state(self) -> dict:
        return {}

    def load_level_state(self, state: dict) -> None:
        pass

    def level_bins(self, levels: Tensor, bins: int) -> Tensor:
        """Each level's bin among `bins` equal ranges of the objective's own noise level (int64, (B,))."""
        raise NotImplementedError

    def bin_labels(self, bins: int) -> list[str]:
        raise NotImplementedError

    def log_snr_quantiles(self, q: Tensor) -> Tensor:
        """λ = −2 ln σ of the training noise levels at quantiles q in (0, 1) of their distribution (for plots)."""
        raise NotImplementedError

    def num_bins(self, requested: int) -> int:
        """How many bins the training loss is logged in (at most the levels there are)."""
        return requested

    def validation_levels(self, fractions: Sequence[float], batch: int, device) -> list[tuple[str, Tensor]]:
        """(label, levels (batch,)) at which the validation loss is logged as val/loss_<label>."""
        raise NotImplementedError

    def validation_mse(self, model: Model, x0: Tensor, levels: Tensor, eps: Tensor) -> Tensor:
        """The squared error of the network's target at fixed levels (what val/loss_<label> logs)."""
        return self.loss(model, x0, levels, eps).mse

    # --- sampling ------------------------------------------------------------------------------------------
    def denoiser(self, model: Model, clip: bool = True) -> Denoiser:
        raise NotImplementedError

    def denoise_at(self, model: Model, x: Tensor, sigma: Tensor) -> Tensor:
        """x̂0 = D(x; σ) for a batch at per-image levels σ (B,) in the VE frame x = x0 + σ ε, with gradients (what
        consistency tuning trains). A discrete objective takes only its trained levels (`trained_sigmas`)."""
        raise NotImplementedError

    def sigma_bounds(self) -> tuple[float, float]:
        """The smallest and largest finite σ its grids reach (where D is asked)."""
        raise NotImplementedError

    def trained_sigmas(self) -> Tensor | None:
        """The σ of a discrete objective's trained levels, increasing (float64); None for a continuous one."""
        return None

    def grid(self, spacing: str | Sequence[int], num_levels: int | None, from_top: bool = False) -> Grid:
        """num_levels noise levels of this spacing, largest first, and the data (from_top: see Denoiser.grid)."""
        raise NotImplementedError

    def default_spacing(self, sampler_default: str) -> str:
        """The spacing a sampler gets when none is set: the sampler's own default where this objective has it."""
        return sampler_default if sampler_default in self.spacings else self.spacings[0]

    # --- records ---------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One phrase for the run's 'model:' line."""
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """What a quality score's protocol records of the objective."""
        return {"objective": self.spec()}


class LogNormalLevels:
    """For an objective (mixed in before Objective) whose training levels are ln σ ~ N(p_mean, p_std²) (EDM, consistency
    tuning): their λ quantiles, and the loss binned over ln σ within p_mean ± 3 p_std (99.7% of the draws; the rest in
    the end bins)."""

    p_mean: float
    p_std: float
    bin_stds: float = 3.0

    def _ln_sigma_range(self) -> tuple[float, float]:
        return self.p_mean - self.bin_stds * self.p_std, self.p_mean + self.bin_stds * self.p_std

    def log_snr_quantiles(self, q: Tensor) -> Tensor:
        """λ = −2 ln σ of the training levels at quantiles q (ln σ ~ N(P_mean, P_std²))."""
        return -2 * (self.p_mean + self.p_std * torch.special.ndtri(q))

    def level_bins(self, levels: Tensor, bins: int) -> Tensor:
        lo, hi = self._ln_sigma_range()
        return ((levels.log() - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()

    def bin_labels(self, bins: int) -> list[str]:
        lo, hi = self._ln_sigma_range()
        edges = [math.exp(lo + k * (hi - lo) / bins) for k in range(bins + 1)]
        return [f"sigma{a:.3g}-{b:.3g}" for a, b in zip(edges, edges[1:], strict=False)]


def weights_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of the objective whose network a spec's weights are: its own, or for an objective that tunes
    another's network (consistency tuning), that one's (`tunes` names the key that holds its spec)."""
    tunes = getattr(objective_class(spec), "tunes", None)
    return weights_spec(spec[tunes]) if tunes and isinstance(spec.get(tunes), dict) else spec


def objective_class(spec: dict[str, Any]) -> type[Objective]:
    """The class a spec's `_target_` names."""
    target = spec.get("_target_")
    module_name, _, cls_name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"objective {target!r} cannot be imported ({err}); the checkpoint was written by another "
                        "version of this package") from err
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise UserError(f"objective {target!r} is not an Objective; give the dotted path of one, e.g. "
                        "diffusion.core.objectives.edm.EDM")
    return cls


def build_objective(spec: dict[str, Any]) -> Objective:
    """The objective a spec (`Objective.spec()`, as checkpoints store it) describes."""
    return objective_class(spec)(**{k: v for k, v in spec.items() if k != "_target_"})
