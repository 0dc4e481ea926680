"""The samplers' registry (SAMPLERS: name -> function, settings, defaults, limits) and the sampler spec.

`SamplerSpec` is a plain dataclass. Hydra uses it as the config schema wherever a sampler is chosen
(sample.py, evaluate.py, figures.py, callbacks.samples, callbacks.quality, the sampler table), so the same
keys work everywhere: `sampler.name=dpmpp_2m sampler.steps=10`. A setting the chosen sampler does not use
stays null, and setting it is an error; `resolved(objective)` fills the settings a sampler uses from SAMPLERS,
the one place their defaults are written (a null name is the objective's own sampler, a null spacing the
objective's choice for that sampler). `steps` is a budget of network evaluations (NFE): every sampler makes
`steps` calls except heun, which makes 2N-1 on N = (steps+1)//2 levels (`SamplerKind.nfe`).
`guidance_scale` w applies to every sampler of a class-conditional model: ε̂ = ε_u + w (ε_c − ε_u), w = 1
conditional (the default, null), w = 0 unconditional (sampling/guidance.py); each network call then
evaluates the batch twice (one forward of 2B) unless w is 0 or 1.

A new sampler is a module in this folder and one entry of SAMPLERS: every command, table and callback reads it.
"""

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from diffusion.core.objectives.base import Objective
from diffusion.core.sampling import consistency, multistep, unipc
from diffusion.core.sampling.ancestral import ddpm_sample, respaced_sample
from diffusion.core.sampling.common import SampleOutput, require_finite_start
from diffusion.core.sampling.ddim import ddim_sample, euler_sample
from diffusion.core.sampling.dpmpp import dpmpp_2m_sample, dpmpp_2m_sde_sample
from diffusion.core.sampling.heun import heun_sample
from diffusion.core.schedules import SPACINGS
from diffusion.errors import UserError

MAX_GUIDANCE = 100  # a guidance scale beyond this only saturates the images
SETTINGS = ("steps", "eta", "spacing", "order")  # what a sampler may or may not use; clip_denoised applies to all
SOLVER_SPACINGS = ("linspace", "trailing", "logsnr", "karras")  # 'leading' never reaches T-1, where x_T lives


def _same(n: int) -> int:
    return n


def _twice(n: int) -> int:
    return 2 * n


def _heun_levels(steps: int) -> int:
    return (steps + 1) // 2


def _heun_nfe(steps: int) -> int:
    return 2 * ((steps + 1) // 2) - 1


@dataclass(frozen=True)
class SamplerKind:
    """A sampler: its function, the settings it takes with their defaults, one line on what it is, and its limits:
    the DDPM spacings it supports, its fewest steps, the grid levels and network calls (NFE) `steps` make, the most
    steps T trained levels allow, the largest η, the orders it has and the highest `steps` allow. `markov_chain`:
    it walks DDPM's chain (DDPM only); `finite_start`: its first step needs a finite noise level; `from_top`: its
    grid must start at DDPM's T-1; `in_table`: it is in evaluate.py's default sampler table (at NFE 5-100)."""

    fn: Callable[..., SampleOutput]
    defaults: Mapping[str, Any]
    summary: str
    spacings: tuple[str, ...] = SPACINGS
    fewest_steps: int = 1
    levels: Callable[[int], int] = _same
    nfe: Callable[[int], int] = _same
    most_steps: Callable[[int], int] = _same
    eta_max: float = 1.0
    eta_hint: str = "0 is deterministic DDIM, 1 DDPM-like"
    orders: tuple[int, ...] = ()
    most_order: Callable[[int], int] | None = None
    markov_chain: bool = False
    finite_start: bool = False
    from_top: bool = False
    in_table: bool = False


SAMPLERS: dict[str, SamplerKind] = {
    "ddpm": SamplerKind(ddpm_sample, {}, "ancestral sampling over all T steps (Ho et al. 2020 Algorithm 2)",
                        markov_chain=True),
    "ddim": SamplerKind(ddim_sample, {"steps": 50, "eta": 0.0, "spacing": "linspace"},
                        "DDIM over `steps` noise levels, η=0 deterministic (Song et al. 2021 Eq. 12)", in_table=True),
    "euler": SamplerKind(euler_sample, {"steps": 50, "spacing": "linspace"},
                         "Euler's method on the probability-flow ODE, `steps` calls (= DDIM with η=0)"),
    "respaced": SamplerKind(respaced_sample, {"steps": 50, "spacing": "linspace"},
                            "ancestral sampling over `steps` of the T steps (Nichol & Dhariwal 2021 Sec. 4)",
                            markov_chain=True),
    "dpmpp_2m": SamplerKind(dpmpp_2m_sample, {"steps": 20, "spacing": "logsnr"},
                            "DPM-Solver++(2M), `steps` network calls (Lu et al. 2022 Algorithm 2)",
                            SOLVER_SPACINGS, from_top=True, in_table=True),
    "dpmpp_2m_sde": SamplerKind(dpmpp_2m_sde_sample, {"steps": 20, "eta": 1.0, "spacing": "logsnr"},
                                "SDE-DPM-Solver++(2M) with noise scale η, `steps` calls (Lu et al. 2022)",
                                SOLVER_SPACINGS, eta_max=math.inf, eta_hint="1 is the SDE, 0 its ODE (= dpmpp_2m)",
                                from_top=True, in_table=True),
    "unipc": SamplerKind(unipc.unipc_sample, {"steps": 20, "spacing": "logsnr", "order": 3},
                         "UniPC-p bh2, `steps` network calls (Zhao et al. 2023)", SOLVER_SPACINGS,
                         orders=unipc.ORDERS, most_order=unipc.most_order, finite_start=True, from_top=True,
                         in_table=True),
    "heun": SamplerKind(heun_sample, {"steps": 20, "spacing": "karras"},
                        "Heun's 2nd-order PF-ODE solver, 2N-1 calls on N=(steps+1)//2 levels (Karras et al. 2022 "
                        "Alg. 1)", SOLVER_SPACINGS, levels=_heun_levels, nfe=_heun_nfe, most_steps=_twice,
                        finite_start=True,
                        from_top=True, in_table=True),
    "ipndm": SamplerKind(multistep.ipndm_sample, {"steps": 10, "spacing": "karras", "order": 4},
                         "iPNDM, Adams-Bashforth of order <= 4 on the PF-ODE, `steps` network calls (Zhang & Chen "
                         "2023)", SOLVER_SPACINGS, orders=multistep.IPNDM_ORDERS,
                         most_order=multistep.most_order(multistep.IPNDM_ORDERS), finite_start=True, from_top=True),
    "deis": SamplerKind(multistep.deis_sample, {"steps": 10, "spacing": "karras", "order": 3},
                        "DEIS tAB, exponential-integrator multistep of order <= 3, `steps` network calls (Zhang & "
                        "Chen 2023)", SOLVER_SPACINGS, orders=multistep.DEIS_ORDERS,
                        most_order=multistep.most_order(multistep.DEIS_ORDERS), finite_start=True, from_top=True),
    "deis_logrho": SamplerKind(multistep.deis_logrho_sample, {"steps": 10, "spacing": "logsnr", "order": 3},
                               "DEIS with ε̂'s polynomial in log σ, order <= 3, `steps` network calls (diffusers' "
                               "DEISMultistepScheduler)", SOLVER_SPACINGS, orders=multistep.DEIS_ORDERS,
                               most_order=multistep.most_order(multistep.DEIS_ORDERS), finite_start=True,
                               from_top=True),
    "consistency": SamplerKind(consistency.consistency_sample, {"steps": 1, "spacing": "karras"},
                               "consistency sampling, `steps` calls with re-noising between them (Song et al. 2023 "
                               "Alg. 1; for objective=consistency)", SOLVER_SPACINGS, levels=consistency.levels_for,
                               most_steps=consistency.most_steps, from_top=True),
}


ALL_ORDERS = tuple(sorted({order for kind in SAMPLERS.values() for order in kind.orders}))


@dataclass
class SamplerSpec:
    """How images are drawn. Settings left null take the sampler's defaults (see SAMPLERS); a null name, the
    objective's own sampler (DDPM: ddpm, Algorithm 2; EDM: heun; flow: euler)."""

    name: str | None = None  # ddpm | ddim | euler | respaced | dpmpp_2m | dpmpp_2m_sde | unipc | heun | ipndm | deis |
    # deis_logrho | consistency
    steps: int | None = None  # budget of network calls (NFE); default 50 (ddim, euler), 20 (solvers)
    eta: float | None = None  # noise scale η (ddim: in [0, 1], default 0; dpmpp_2m_sde: >= 0, default 1)
    spacing: str | None = None  # linspace | leading | trailing | logsnr | karras: which noise levels
    clip_denoised: bool = True  # clamp every predicted x0 to [-1, 1]
    order: int | None = None  # unipc's, deis's and deis_logrho's order p in {1, 2, 3}, ipndm's in {1, 2, 3, 4}
    # (default: the highest the steps allow)
    guidance_scale: float | None = None  # classifier-free guidance w >= 0 (class-conditional models); null: 1

    def check(self, key: str = "sampler") -> "SamplerSpec":
        """Raise a one-line UserError naming `key.<field>` for anything wrong (the objective aside); return self."""
        if self.name is None:
            return self._check_settings(key, None)
        if self.name not in SAMPLERS:
            swapped = [n for n in SAMPLERS if sorted(n) == sorted(str(self.name))]  # letters swapped: ddmi -> ddim
            close = swapped or difflib.get_close_matches(str(self.name), SAMPLERS, n=1)
            hint = f"did you mean {key}.name={close[0]}? " if close else ""
            raise UserError(f"{key}.name={self.name} is not a sampler; {hint}choose one of {list(SAMPLERS)}")
        return self._check_settings(key, SAMPLERS[self.name])

    def _check_settings(self, key: str, kind: SamplerKind | None) -> "SamplerSpec":
        if kind is not None:
            for setting in SETTINGS:
                value = getattr(self, setting)
                if value is not None and setting not in kind.defaults:
                    raise UserError(f"{key}.{setting}={_shown(value)} is not used by {key}.name={self.name} "
                                    f"({kind.summary}); {_alternative(key, setting, value)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise UserError(f"{key}.steps must be an integer >= 1, got {self.steps!r}; try {key}.steps=50")
        if kind is not None and self.steps is not None and self.steps < kind.fewest_steps:
            raise UserError(f"{key}.steps={self.steps} is below the {kind.fewest_steps} steps {key}.name={self.name} "
                            f"needs; use {key}.steps={kind.fewest_steps} or more")
        if kind is not None and self.eta is not None and not (math.isfinite(self.eta)
                                                              and 0.0 <= self.eta <= kind.eta_max):
            rule = f"in [0, {kind.eta_max:g}]" if math.isfinite(kind.eta_max) else ">= 0"
            raise UserError(f"{key}.eta must be {rule}, got {self.eta}; use a value {rule} ({kind.eta_hint})")
        if kind is None and self.spacing is not None and not isinstance(self.spacing, list | tuple) \
                and self.spacing not in SPACINGS:  # the objective's own sampler: any spacing there is
            raise UserError(f"{key}.spacing={_shown(self.spacing)} is not a spacing; choose one of {list(SPACINGS)}")
        if kind is None and self.order is not None and self.order not in ALL_ORDERS:
            raise UserError(f"{key}.order must be one of {list(ALL_ORDERS)}, got {self.order!r}; try {key}.order=3")
        if kind is None and self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise UserError(f"{key}.eta must be a number >= 0, got {self.eta}; try {key}.eta=0")
        if kind is not None and self.spacing is not None and not isinstance(self.spacing, list | tuple) \
                and self.spacing not in kind.spacings:
            why = "is not a spacing" if self.spacing not in SPACINGS else f"is not a spacing of {key}.name={self.name}"
            if self.spacing == "leading":
                why += " (its steps never reach index T-1, where x_T lives)"
            raise UserError(f"{key}.spacing={_shown(self.spacing)} {why}; choose one of {list(kind.spacings)}")
        if kind is not None and self.order is not None:
            self._check_order(key, self.steps)
        w = self.guidance_scale
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= MAX_GUIDANCE):
            raise UserError(f"{key}.guidance_scale must be a number in [0, {MAX_GUIDANCE}], got {w!r}; try "
                            f"{key}.guidance_scale=2 (1: conditional, 0: unconditional)")
        return self

    def _check_order(self, key: str, steps: int | None) -> None:
        """The order is one the sampler has, and one `steps` allow (UniPC-p needs 2p-1 levels)."""
        kind = SAMPLERS[self.name]
        if isinstance(self.order, bool) or self.order not in kind.orders:
            raise UserError(f"{key}.order must be one of {list(kind.orders)}, got {self.order!r}; "
                            f"try {key}.order={kind.defaults['order']}")
        if steps is not None and self.order > kind.most_order(steps):
            fewest = next(n for n in range(1, 2 * max(kind.orders) + 2) if kind.most_order(n) >= self.order)
            raise UserError(f"{key}.order={self.order} needs {key}.steps >= {fewest} (its first steps warm up and its "
                            f"last lower the order), got {steps} steps; use {key}.order={kind.most_order(steps)} "
                            f"or {key}.steps={fewest}")

    def named(self, objective: Objective) -> "SamplerSpec":
        """The spec with the objective's own sampler when no name is set."""
        return self if self.name is not None else replace(self, name=objective.default_sampler)

    def most_steps(self, objective: Objective) -> int | None:
        """The most steps the objective allows this sampler (DDPM: T levels, heun 2T calls; continuous: any)."""
        if objective.num_levels is None:
            return None
        return SAMPLERS[self.named(objective).name].most_steps(objective.num_levels)

    def check_for(self, objective: Objective, key: str = "sampler") -> "SamplerSpec":
        """Everything check() cannot know: the objective's chain, its levels (DDPM's T), its spacings, the order the
        (default) steps allow, and the grid itself (built: a flow grid from t = 1 for a sampler that cannot start
        there); for a null name, the settings against the objective's own sampler. Returns the resolved spec.

        The second half of a spec's validation: check() runs with the config's other rules (a command's precheck),
        this once the objective is known (train.py: at once; the other commands: from their checkpoint)."""
        spec = self.named(objective)
        if self.name is None:
            spec._check_settings(key, SAMPLERS[spec.name])
        kind, where = SAMPLERS[spec.name], f"objective={objective.name}"
        if kind.markov_chain and not objective.markov_chain:
            raise UserError(f"{key}.name={spec.name} walks DDPM's Markov chain ({kind.summary}); {where} has none: use "
                            f"{key}.name=heun, euler or dpmpp_2m")
        most = spec.most_steps(objective)
        if spec.steps is not None and most is not None and spec.steps > most:
            fix = f"use {key}.steps={min(kind.defaults.get('steps', 50), most)} or at most {most}"
            if most == objective.num_levels:
                raise UserError(f"{key}.steps={spec.steps} exceeds the model's T={objective.num_levels} steps; {fix}")
            raise UserError(f"{key}.steps={spec.steps} exceeds what the model's T={objective.num_levels} steps allow "
                            f"{key}.name={spec.name} ({kind.summary}); {fix}")
        if spec.spacing is not None and not objective.markov_chain and spec.spacing not in objective.spacings:
            raise UserError(f"{key}.spacing={_shown(spec.spacing)} is not a spacing of {where}; choose one of "
                            f"{list(objective.spacings)}")
        resolved = spec._filled(objective)
        if spec.order is not None:
            spec._check_order(key, resolved.steps)
        if "spacing" in kind.defaults:
            grid = objective.grid(resolved.spacing, kind.levels(resolved.steps), from_top=kind.from_top)
            if kind.finite_start:
                require_finite_start(grid, spec.name, key)
        return resolved

    def _filled(self, objective: Objective) -> "SamplerSpec":
        """Every setting the sampler uses filled from its defaults: default steps capped at what the objective
        allows, a default order at what the steps allow, a default spacing the objective's choice."""
        spec = self.named(objective)
        kind = SAMPLERS[spec.name]
        filled = {k: v for k, v in kind.defaults.items() if getattr(spec, k) is None}
        most = spec.most_steps(objective)
        if "steps" in filled and most is not None:
            filled["steps"] = min(filled["steps"], most)
        if "order" in filled:
            filled["order"] = min(filled["order"], kind.most_order(filled.get("steps", spec.steps)))
        if "spacing" in filled:
            filled["spacing"] = objective.default_spacing(filled["spacing"])
        return replace(spec, **filled)

    def resolved(self, objective: Objective) -> "SamplerSpec":
        """The spec as it runs on this objective, every setting the sampler uses filled in (what check_for returns),
        unchecked: for callers whose command has checked it (drawing, the callbacks)."""
        return self._filled(objective)

    def sampler_kwargs(self, objective: Objective) -> dict[str, Any]:
        """The keyword arguments of the sampler function, beyond the denoiser, x_T and the generator."""
        spec = self.resolved(objective)
        kwargs = {k: getattr(spec, k) for k in SAMPLERS[spec.name].defaults}
        if "steps" in kwargs:
            kwargs["num_steps"] = kwargs.pop("steps")
        return kwargs

    def describe(self, objective: Objective) -> dict[str, Any]:
        """What a score's protocol records of the sampler (the steps of ddpm are T). `order` appears only for the
        samplers that take it, so the protocols of ddpm, ddim and respaced are those recorded before."""
        spec = self.resolved(objective)
        described = {"name": spec.name, "steps": objective.num_levels if spec.steps is None else spec.steps,
                     "eta": spec.eta, "spacing": spec.spacing, "clip_denoised": spec.clip_denoised}
        if "order" in SAMPLERS[spec.name].defaults:
            described["order"] = spec.order
        if spec.guidance_scale is not None:  # only when set: unguided protocols stay those recorded before
            described["guidance_scale"] = spec.guidance_scale
        return described

    def nfe(self, objective: Objective) -> int:
        """Network evaluations one image costs (ddpm: T; heun: 2N-1; the others: steps)."""
        described = self.describe(objective)
        return SAMPLERS[described["name"]].nfe(described["steps"])

    def label(self, objective: Objective) -> str:
        """Short and human: 'ddpm-1000', 'ddim-50 η=0', 'respaced-100', 'unipc-20 order=3'."""
        return sampler_label(self.describe(objective))

    def tag(self, objective: Objective) -> str:
        """A metric-name suffix: 'dpmpp_2m-10', plus each setting that was set away from its default
        ('ddim-10-eta0.5', 'unipc-20-order2', 'heun-9-logsnr', '-noclip')."""
        spec = self.named(objective)
        defaults = SAMPLERS[spec.name].defaults
        parts = [f"{spec.name}-{self.describe(objective)['steps']}"]
        for setting in ("eta", "order", "spacing"):
            value = getattr(spec, setting)
            if value is not None and value != defaults.get(setting):
                parts.append(value if setting == "spacing" else f"{setting}{value:g}")
        if spec.guidance_scale is not None:
            parts.append(f"w{spec.guidance_scale:g}")
        return "-".join(parts + ([] if spec.clip_denoised else ["noclip"]))


def sampler_label(described: Mapping[str, Any]) -> str:
    """The label of a described sampler (SamplerSpec.describe's dict, as protocols store it); the spacing only
    where it is not the sampler's default ('dpmpp_2m-10 karras')."""
    eta, order, w = described.get("eta"), described.get("order"), described.get("guidance_scale")
    kind = SAMPLERS.get(described["name"])
    spacing = described.get("spacing")
    spacing = spacing if spacing is not None and kind is not None and spacing != kind.defaults.get("spacing") else None
    return (f"{described['name']}-{described['steps']}" + (f" η={eta:g}" if eta is not None else "")
            + (f" order={order}" if order is not None else "") + (f" {spacing}" if spacing is not None else "")
            + (f" w={w:g}" if w is not None else ""))


def sampler_spec(value: "SamplerSpec | Mapping[str, Any] | None", default: SamplerSpec | None = None) -> SamplerSpec:
    """A SamplerSpec from a spec, a mapping of its fields (a validated config node) or None (the default), unchecked:
    what constructors take, the command having checked its config."""
    if value is None:
        return default or SamplerSpec()
    return value if isinstance(value, SamplerSpec) else SamplerSpec(**dict(value))


def as_sampler_spec(value: "SamplerSpec | Mapping[str, Any] | None", key: str = "sampler",
                    default: SamplerSpec | None = None) -> SamplerSpec:
    """A SamplerSpec from a spec, a mapping of its fields (a plain dict or a config node) or None (the default),
    checked (check(): what a config is checked with)."""
    if value is None:
        value = default or SamplerSpec()
    if isinstance(value, Mapping):
        known = {f.name for f in fields(SamplerSpec)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(f"{key}.{unknown[0]} is not a sampler setting; the settings are {sorted(known)}")
        value = SamplerSpec(**dict(value))
    if not isinstance(value, SamplerSpec):
        raise UserError(f"{key} must be a group of settings, got {value!r}; write {key}.name={value} "
                        f"(and {key}.steps=..., {key}.eta=...)")
    return value.check(key)


def _alternative(key: str, setting: str, value: Any) -> str:
    """The fix for a setting the sampler does not use: the samplers that do (respaced first for steps), with the
    value if that sampler accepts it, else its default."""
    takers = [name for name, kind in SAMPLERS.items() if setting in kind.defaults]
    taker = "respaced" if setting in ("steps", "spacing") and "respaced" in takers else takers[0]
    try:
        SamplerSpec(name=taker, **{setting: value}).check(key)
    except (UserError, TypeError):
        value = SAMPLERS[taker].defaults[setting]
    why = " for ancestral sampling over fewer steps" if taker == "respaced" else ""
    return (f"use {key}.name={taker} {key}.{setting}={_shown(value)}{why}, or drop {key}.{setting} (samplers that "
            f"take it: {takers})")


def _shown(value: Any) -> str:
    """As a command line spells it ('' for the empty string)."""
    return "''" if value == "" else str(value)
