"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3
and App. C): track two power-function EMAs during training, save their snapshots, and afterwards rebuild the
average of any width as a least-squares combination of the snapshots.

Steps count optimizer steps from 1: θ_t are the weights after step t. The power EMA of exponent γ is
θ̂_t = β_t θ̂_{t-1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1) (App. C.2 Eq. 127), so θ_t has the weight
(t^(γ+1) − (t−1)^(γ+1)) / T^(γ+1) in θ̂_T: exactly the profile p_T(τ) = (γ+1) τ^γ / T^(γ+1) on [0, T]
integrated over (t−1, t], the weights being held constant within a step. The width of a profile is σ_rel,
its standard deviation over its length T. A classic EMA of constant decay β has a profile of std
sqrt(β)/(1 − β) steps, so σ_rel ≈ sqrt(β)/((1 − β) t) at step t ≫ 1/(1 − β): decay 0.9999 is σ_rel 0.0125
at step 800,000 (`decay_to_sigma_rel`).
"""

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffusion.errors import UserError

SIGMA_REL_MAX = math.sqrt(1 / 12)  # γ = 0: the plain average since step 0, the widest power profile
MAX_FIT_ERROR = 0.05  # relative L2 error of a reconstructed profile beyond which a σ_rel is refused
SNAPSHOT_RE = re.compile(r"step_(\d+)\.pt")


def gamma_to_sigma_rel(gamma: float) -> float:
    """σ_rel of the power profile of exponent γ: sqrt((γ+1) / ((γ+2)² (γ+3))), EDM2 Eq. 123."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """γ for a σ_rel in (0, 1/sqrt(12)]: the largest root of γ³ + 7γ² + (16 − σ⁻²)γ + 12 − σ⁻², EDM2 Eq. 126."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise UserError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (1/sqrt(12), a plain average), got "
                        f"{sigma_rel}; try 0.05 to 0.2")
    s = sigma_rel**-2
    gamma = 1 / sigma_rel  # the cubic is > 0 here (σ_rel(γ) < 1/γ) and convex on γ > −7/3
    for _ in range(200):  # Newton from the right: decreases monotonically onto the largest root
        step = (((gamma + 7) * gamma + 16 - s) * gamma + 12 - s) / ((3 * gamma + 14) * gamma + 16 - s)
        if not step > 0:
            break
        gamma -= step
    return max(gamma, 0.0)  # the root is >= 0 for σ_rel <= 1/sqrt(12); rounding may leave −1e-16


def power_ema_beta(t: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ+1) for the update after step t >= 1, EDM2 Eq. 127 (β_1 = 0: θ̂_1 = θ_1)."""
    return (1 - 1 / t) ** (gamma + 1)


def decay_to_sigma_rel(decay: float, step: int) -> float:
    """σ_rel at `step` of a classic EMA of constant decay β: std sqrt(β)/(1 − β) steps (geometric profile) over step."""
    return math.sqrt(decay) / (1 - decay) / step


def sigma_rel_to_decay(sigma_rel: float, step: int) -> float:
    """The constant decay β whose EMA has width σ_rel at `step`: sqrt(β) solves s·x² + x − s = 0, s = σ_rel·step."""
    s = sigma_rel * step
    return ((math.sqrt(1 + 4 * s * s) - 1) / (2 * s)) ** 2


def _column(values: Sequence[float] | Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64).reshape(shape)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> Tensor:
    """<p_a, p_b> = ∫ p_a(τ) p_b(τ) dτ for every pair of power profiles (t, γ), EDM2 Eq. 151: (len a, len b).

    ∫_0^min (γa+1)(γb+1) τ^(γa+γb) / (ta^(γa+1) tb^(γb+1)) dτ = (γa+1)(γb+1) / ((γa+γb+1) hi) · (lo/hi)^γ_hi,
    with lo, hi = min, max(ta, tb) and γ_hi the exponent of the longer profile.
    """
    ta, ga = _column(steps_a, (-1, 1)), _column(gammas_a, (-1, 1))  # (A, 1)
    tb, gb = _column(steps_b, (1, -1)), _column(gammas_b, (1, -1))  # (1, B)
    lo, hi = torch.minimum(ta, tb), torch.maximum(ta, tb)
    gamma_hi = torch.where(ta >= tb, ga, gb)
    return (ga + 1) * (gb + 1) / ((ga + gb + 1) * hi) * (lo / hi) ** gamma_hi


def _check_snapshots(steps: Sequence[int], gammas: Sequence[float]) -> None:
    if len(steps) == 0 or len(steps) != len(gammas):
        raise UserError(f"need one gamma per snapshot step and at least one snapshot, got {len(steps)} steps and "
                        f"{len(gammas)} gammas; pass equal-length lists")
    if min(steps) < 1 or min(gammas) <= -1:
        raise UserError(f"snapshot steps must be >= 1 and gammas > -1, got steps from {min(steps)} and gammas from "
                        f"{min(gammas)}; steps count optimizer steps from 1")
    pairs = list(zip(steps, gammas, strict=True))
    if len(set(pairs)) != len(pairs):
        twice = next(p for p in pairs if pairs.count(p) > 1)
        raise UserError(f"snapshot (step, gamma) {twice} is given twice; pass each snapshot once")


def solve_weights(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int,
                  target_gamma: float | Sequence[float]) -> Tensor:
    """Least-squares weights of the snapshots' profiles for the target profile(s), summing to 1, EDM2 Alg. 3.

    Solves A w = b with A the snapshots' Gram matrix and b their inner products with the target, in float64;
    returns (K,) for one target gamma, (K, M) for M of them.
    """
    _check_snapshots(snapshot_steps, snapshot_gammas)
    if target_step < 1:
        raise UserError(f"target_step must be >= 1, got {target_step}; use the step of the last snapshot")
    gammas = torch.as_tensor(target_gamma, dtype=torch.float64)
    A = profile_inner_products(snapshot_steps, snapshot_gammas, snapshot_steps, snapshot_gammas)  # (K, K)
    b = profile_inner_products(snapshot_steps, snapshot_gammas, [target_step] * gammas.numel(), gammas)  # (K, M)
    w = torch.linalg.solve(A, b)
    w = w / w.sum(0, keepdim=True)  # a constant trajectory is reproduced exactly
    return w.reshape(-1) if gammas.ndim == 0 else w


def fit_error(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int,
              target_gamma: float | Sequence[float], weights: Tensor) -> Tensor:
    """‖Σ_k w_k p_k − p*‖ / ‖p*‖ in L2: how far the reconstructed profile is from the target one (0 = exact)."""
    gammas = torch.as_tensor(target_gamma, dtype=torch.float64).reshape(-1)
    w = weights.reshape(len(snapshot_steps), -1)  # (K, M)
    A = profile_inner_products(snapshot_steps, snapshot_gammas, snapshot_steps, snapshot_gammas)
    b = profile_inner_products(snapshot_steps, snapshot_gammas, [target_step] * len(gammas), gammas)
    c = (gammas + 1) ** 2 / ((2 * gammas + 1) * target_step)  # ‖p*‖²
    squared = (w * (A @ w)).sum(0) - 2 * (w * b).sum(0) + c
    return (squared.clamp(min=0) / c).sqrt().reshape(torch.as_tensor(target_gamma).shape)


def reconstructable_range(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], target_step: int,
                          max_error: float = MAX_FIT_ERROR) -> tuple[float, float]:
    """The σ_rel interval, around the widest tracked one, whose profiles these snapshots fit within max_error."""
    grid = torch.logspace(math.log10(1e-3), math.log10(SIGMA_REL_MAX), 400, dtype=torch.float64)
    grid[-1] = SIGMA_REL_MAX
    gammas = [sigma_rel_to_gamma(float(s)) for s in grid]
    errors = fit_error(snapshot_steps, snapshot_gammas, target_step, gammas,
                       solve_weights(snapshot_steps, snapshot_gammas, target_step, gammas))
    # the grid point nearest the widest tracked profile (fit exactly at target_step), then outwards
    i = int((grid - gamma_to_sigma_rel(min(snapshot_gammas))).abs().argmin())
    lo = hi = i
    while lo > 0 and errors[lo - 1] <= max_error:
        lo -= 1
    while hi < len(grid) - 1 and errors[hi + 1] <= max_error:
        hi += 1
    return float(grid[lo]), float(grid[hi])


def reconstruct(snapshot_state_dicts: Iterable[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Σ_k w_k θ̂_k over snapshot averages (an iterable: one in memory at a time), summed in float64, in their dtype."""
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for k, (state, w) in enumerate(zip(snapshot_state_dicts, [float(w) for w in weights], strict=True)):
        if k == 0:
            total = {n: v.to(torch.float64) * w for n, v in state.items()}
            dtypes = {n: v.dtype for n, v in state.items()}
        elif state.keys() != total.keys() or any(v.shape != total[n].shape for n, v in state.items()):
            raise UserError(f"snapshot {k} holds other tensors than snapshot 0 ({len(state)} vs {len(total)}); "
                            "reconstruct from snapshots of one net")
        else:
            for n, v in state.items():
                total[n].add_(v.to(torch.float64), alpha=w)
    if not dtypes:
        raise UserError("no snapshots to reconstruct from; pass at least one state dict and weight")
    return {n: v.to(dtypes[n]) for n, v in total.items()}


class PowerEMA:
    """Power-function EMAs (one per σ_rel) of a set of named tensors, updated with one foreach op per profile."""

    def __init__(self, named_tensors: Mapping[str, Tensor], sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = list(named_tensors)
        self.step = 0  # updates so far: θ̂ is the average of θ_1 .. θ_step
        self.averages = [[v.detach().clone() for v in named_tensors.values()] for _ in self.gammas]

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor]) -> None:
        """θ̂ ← β_t θ̂ + (1 − β_t) θ_t for the next step t, over all tensors at once (same order as the names)."""
        self.step += 1
        current = [v.detach() for v in tensors]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, current, 1.0 - power_ema_beta(self.step, gamma))

    def averaged(self, k: int) -> dict[str, Tensor]:
        """The k-th profile's average as a state dict (the tensors themselves, not copies)."""
        return dict(zip(self.names, self.averages[k], strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sigma_rels": list(self.sigma_rels), "names": list(self.names),
                "averages": [list(a) for a in self.averages]}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["sigma_rels"]) != self.sigma_rels:
            raise UserError(f"the saved post-hoc EMA tracks sigma_rels {tuple(state['sigma_rels'])}, this run asks "
                            f"for {self.sigma_rels}; resume with sigma_rels={list(state['sigma_rels'])}")
        shapes = [tuple(v.shape) for v in state["averages"][0]]
        if list(state["names"]) != self.names or shapes != [tuple(v.shape) for v in self.averages[0]]:
            raise UserError(f"the saved post-hoc EMA averages another net ({len(shapes)} tensors, this net has "
                            f"{len(self.names)} or other shapes); resume with the model config of that run")
        for mine, saved in zip(self.averages, state["averages"], strict=True):
            torch._foreach_copy_(mine, [v.to(mine[0].device) for v in saved])
        self.step = int(state["step"])


def snapshot_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def snapshot_contents(ema: PowerEMA, buffers: Mapping[str, Tensor]) -> dict[str, Any]:
    """What a snapshot file holds: the step, each profile's σ_rel, γ and average (on the CPU), the net's buffers."""
    cpu = lambda state: {n: v.detach().cpu() for n, v in state.items()}  # noqa: E731
    return {"step": ema.step, "sigma_rels": list(ema.sigma_rels), "gammas": list(ema.gammas),
            "averages": [cpu(ema.averaged(k)) for k in range(len(ema.gammas))], "buffers": cpu(buffers)}


def load_posthoc_ema(snapshot_dir, sigma_rel: float, max_fit_error: float = MAX_FIT_ERROR,
                     max_step: int | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The net's weights averaged with width σ_rel at the last snapshot's step, rebuilt from a run's snapshots
    (those up to max_step if given: a checkpoint's step).

    Returns the net's state dict (float32 like the snapshots; buffers from the last snapshot) and an info dict:
    step, sigma_rel, gamma, fit_error, the reconstructable σ_rel range and each snapshot's (step, σ_rel, weight).
    """
    snapshot_dir = Path(snapshot_dir)
    snapshots = _read_snapshots(snapshot_dir, max_step)
    steps = [s["step"] for s in snapshots for _ in s["gammas"]]
    gammas = [g for s in snapshots for g in s["gammas"]]
    target = snapshots[-1]["step"]
    lo, hi = reconstructable_range(steps, gammas, target, max_fit_error)
    error, weights = math.inf, None
    if 0 < sigma_rel <= SIGMA_REL_MAX:
        gamma = sigma_rel_to_gamma(sigma_rel)
        weights = solve_weights(steps, gammas, target, gamma)
        error = float(fit_error(steps, gammas, target, gamma, weights))
    if not error <= max_fit_error:
        why = f"profile fit error {error:.0%} > {max_fit_error:.0%}" if weights is not None else \
            f"outside (0, {SIGMA_REL_MAX:.4f}], the widths of power-function averages"
        raise UserError(f"sigma_rel={sigma_rel} cannot be reconstructed from the {len(snapshots)} snapshots in "
                        f"{snapshot_dir} ({why}); at step {target} they allow about [{lo:.3f}, {hi:.3f}]: choose "
                        "sigma_rel there, or train with snapshots more often (a smaller every_n_steps)")
    state = reconstruct((a for s in snapshots for a in s["averages"]), weights.tolist())
    state.update(snapshots[-1]["buffers"])
    sources = [(s["step"], r) for s in snapshots for r in s["sigma_rels"]]
    info = {"step": target, "sigma_rel": sigma_rel, "gamma": gamma, "fit_error": error, "range": (lo, hi),
            "snapshots": [(t, r, float(w)) for (t, r), w in zip(sources, weights, strict=True)]}
    return state, info


def _read_snapshots(snapshot_dir: Path, max_step: int | None = None) -> list[dict[str, Any]]:
    """Every step_<step>.pt in the folder (memory-mapped; up to max_step), by step; one-line errors for what
    cannot be used."""
    if not snapshot_dir.is_dir():
        raise UserError(f"post-hoc EMA snapshot folder {snapshot_dir} does not exist; give the posthoc_ema folder "
                        "of a run trained with the PostHocEMA callback, e.g. outputs/<name>/<time>/posthoc_ema")
    files = sorted((int(m.group(1)), p) for p in snapshot_dir.iterdir() if (m := SNAPSHOT_RE.fullmatch(p.name)))
    if not files:
        raise UserError(f"no post-hoc EMA snapshots (step_<step>.pt) in {snapshot_dir}; give the posthoc_ema folder "
                        "of a run trained with the PostHocEMA callback for at least every_n_steps steps")
    if max_step is not None and files[0][0] > max_step:
        raise UserError(f"the post-hoc EMA snapshots in {snapshot_dir} start at step {files[0][0]}, after the "
                        f"checkpoint's step {max_step}; evaluate a later checkpoint (e.g. last.ckpt)")
    files = [(step, path) for step, path in files if max_step is None or step <= max_step]
    snapshots, first = [], None
    for step, path in files:
        try:
            snapshot = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes = [{n: tuple(v.shape) for n, v in a.items()} for a in snapshot["averages"]]
            ok = snapshot["step"] == step and len(snapshot["gammas"]) == len(shapes) > 0
        except Exception as err:  # torch.load's many ways to fail on a cut-off or foreign file
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise UserError(f"post-hoc EMA snapshot {path} cannot be read ({type(err).__name__}: {first_line}); "
                            "move it out of that folder and load again") from err
        if not ok:
            raise UserError(f"post-hoc EMA snapshot {path} holds step {snapshot['step']} and {len(shapes)} averages; "
                            "it was not written by PostHocEMA (or was renamed): move it out of that folder")
        first = first or (path, shapes[0])
        for other in shapes:
            if other != first[1]:
                name = next(n for n in [*first[1], *other] if first[1].get(n) != other.get(n))
                raise UserError(f"the snapshots in {snapshot_dir} are of different nets: {name} has shape "
                                f"{first[1].get(name)} in {first[0].name} but {other.get(name)} in {path.name}; "
                                "keep one run's snapshots in a folder")
        snapshots.append(snapshot)
    return snapshots
