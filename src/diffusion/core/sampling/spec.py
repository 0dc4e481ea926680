"""The sampler spec: which sampler draws images, with which settings. One schema for every `sampler` node.

`SamplerSpec` is a plain dataclass. Hydra uses it as the config schema wherever a sampler is chosen
(sample.py, evaluate.py, figures.py, callbacks.samples, callbacks.quality, the sampler table), so the same
keys work everywhere: `sampler.name=dpmpp_2m sampler.steps=10`. A setting the chosen sampler does not use
stays null, and setting it is an error; `resolved()` fills the settings a sampler uses from `SAMPLERS`, the
one place their defaults are written. `steps` is a budget of network evaluations (NFE): every sampler makes
`steps` calls except heun, which makes 2N-1 on N = (steps+1)//2 points (`SamplerKind.nfe`).
`guidance_scale` w applies to every sampler of a class-conditional model: ε̂ = ε_u + w (ε_c − ε_u), w = 1
conditional (the default, null), w = 0 unconditional (sampling/guidance.py); each network call then
evaluates the batch twice (one forward of 2B) unless w is 0 or 1.
"""

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from diffusion.core.sampling.ancestral import SampleOutput, ddim_sample, ddpm_sample, respaced_sample
from diffusion.core.sampling.solvers import SOLVER_SPECS, SOLVERS, UNIPC_ORDERS, unipc_most_order
from diffusion.core.schedules import SPACINGS
from diffusion.errors import UserError

MAX_GUIDANCE = 100  # a guidance scale beyond this only saturates the images
SETTINGS = ("steps", "eta", "spacing", "order")  # what a sampler may or may not use; clip_denoised applies to all


def _all_steps(num_timesteps: int) -> int:
    return num_timesteps


def _one_call_per_step(steps: int) -> int:
    return steps


@dataclass(frozen=True)
class SamplerKind:
    """A sampler: its function, the settings it takes with their defaults, one line on what it is, and its
    limits: the spacings it supports, its fewest steps, the most steps a T-step model allows, the network
    calls (NFE) it makes for `steps`, the largest η, and the highest order `steps` allow (samplers with one)."""

    fn: Callable[..., SampleOutput]
    defaults: Mapping[str, Any]
    summary: str
    spacings: tuple[str, ...] = SPACINGS
    fewest_steps: int = 1
    most_steps: Callable[[int], int] = _all_steps
    nfe: Callable[[int], int] = _one_call_per_step
    eta_max: float = 1.0
    eta_hint: str = "0 is deterministic DDIM, 1 DDPM-like"
    orders: tuple[int, ...] = ()
    most_order: Callable[[int], int] | None = None


def _solver(name: str, defaults: Mapping[str, Any], summary: str, **limits: Any) -> SamplerKind:
    """A fast solver's kind: its function and limits from sampling.solvers, its defaults here."""
    spec = SOLVER_SPECS[name]
    return SamplerKind(SOLVERS[name], defaults, summary, spec.spacings, spec.fewest_steps, spec.most_steps, spec.nfe,
                       **limits)


SAMPLERS: dict[str, SamplerKind] = {
    "ddpm": SamplerKind(ddpm_sample, {}, "ancestral sampling over all T steps (Ho et al. 2020 Algorithm 2)"),
    "ddim": SamplerKind(ddim_sample, {"steps": 50, "eta": 0.0, "spacing": "linspace"},
                        "DDIM over `steps` of the T steps, η=0 deterministic (Song et al. 2021 Eq. 12)"),
    "respaced": SamplerKind(respaced_sample, {"steps": 50, "spacing": "linspace"},
                            "ancestral sampling over `steps` of the T steps (Nichol & Dhariwal 2021 Sec. 4)"),
    "dpmpp_2m": _solver("dpmpp_2m", {"steps": 20, "spacing": "logsnr"},
                        "DPM-Solver++(2M), `steps` network calls (Lu et al. 2022 Algorithm 2)"),
    "dpmpp_2m_sde": _solver("dpmpp_2m_sde", {"steps": 20, "eta": 1.0, "spacing": "logsnr"},
                            "SDE-DPM-Solver++(2M) with noise scale η, `steps` calls (Lu et al. 2022)",
                            eta_max=math.inf, eta_hint="1 is the SDE, 0 its ODE (= dpmpp_2m)"),
    "unipc": _solver("unipc", {"steps": 20, "spacing": "logsnr", "order": 3},
                     "UniPC-p bh2, `steps` network calls (Zhao et al. 2023)", orders=UNIPC_ORDERS,
                     most_order=unipc_most_order),
    "heun": _solver("heun", {"steps": 20, "spacing": "karras"},
                    "Heun's 2nd-order PF-ODE solver, 2N-1 calls on N=(steps+1)//2 points (Karras et al. 2022 Alg. 1)"),
}


@dataclass
class SamplerSpec:
    """How images are drawn. Settings left null take the sampler's defaults (see SAMPLERS)."""

    name: str = "ddpm"  # ddpm | ddim | respaced | dpmpp_2m | dpmpp_2m_sde | unipc | heun
    steps: int | None = None  # budget of network calls (NFE), at most T (heun 2T); default 50 (ddim), 20 (solvers)
    eta: float | None = None  # noise scale η (ddim: in [0, 1], default 0; dpmpp_2m_sde: >= 0, default 1)
    spacing: str | None = None  # linspace | leading | trailing | logsnr | karras: which of the T steps
    clip_denoised: bool = True  # clamp every predicted x0 to [-1, 1]
    order: int | None = None  # unipc's order p in {1, 2, 3} (default 3, lowered to what the steps allow)
    guidance_scale: float | None = None  # classifier-free guidance w >= 0 (class-conditional models); null: 1

    def check(self, key: str = "sampler") -> "SamplerSpec":
        """Raise a one-line UserError naming `key.<field>` for anything wrong (T aside); return self."""
        if self.name not in SAMPLERS:
            swapped = [n for n in SAMPLERS if sorted(n) == sorted(str(self.name))]  # letters swapped: ddmi -> ddim
            close = swapped or difflib.get_close_matches(str(self.name), SAMPLERS, n=1)
            hint = f"did you mean {key}.name={close[0]}? " if close else ""
            raise UserError(f"{key}.name={self.name} is not a sampler; {hint}choose one of {list(SAMPLERS)}")
        kind = SAMPLERS[self.name]
        for setting in SETTINGS:
            value = getattr(self, setting)
            if value is not None and setting not in kind.defaults:
                raise UserError(f"{key}.{setting}={_shown(value)} is not used by {key}.name={self.name} "
                                f"({kind.summary}); {_alternative(key, setting, value)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise UserError(f"{key}.steps must be an integer >= 1, got {self.steps!r}; try {key}.steps=50")
        if self.steps is not None and self.steps < kind.fewest_steps:
            raise UserError(f"{key}.steps={self.steps} is below the {kind.fewest_steps} steps {key}.name={self.name} "
                            f"needs; use {key}.steps={kind.fewest_steps} or more")
        if self.eta is not None and not (math.isfinite(self.eta) and 0.0 <= self.eta <= kind.eta_max):
            rule = f"in [0, {kind.eta_max:g}]" if math.isfinite(kind.eta_max) else ">= 0"
            raise UserError(f"{key}.eta must be {rule}, got {self.eta}; use a value {rule} ({kind.eta_hint})")
        if self.spacing is not None and self.spacing not in kind.spacings:
            why = "is not a spacing" if self.spacing not in SPACINGS else f"is not a spacing of {key}.name={self.name}"
            if self.spacing == "leading":
                why += " (its steps never reach index T-1, where x_T lives)"
            raise UserError(f"{key}.spacing={_shown(self.spacing)} {why}; choose one of {list(kind.spacings)}")
        if self.order is not None:
            self._check_order(key, self.steps)
        w = self.guidance_scale
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= MAX_GUIDANCE):
            raise UserError(f"{key}.guidance_scale must be a number in [0, {MAX_GUIDANCE}], got {w!r}; try "
                            f"{key}.guidance_scale=2 (1: conditional, 0: unconditional)")
        return self

    def _check_order(self, key: str, steps: int | None) -> None:
        """The order is one the sampler has, and one `steps` allow (UniPC-p needs 2p-1 steps)."""
        kind = SAMPLERS[self.name]
        if isinstance(self.order, bool) or self.order not in kind.orders:
            raise UserError(f"{key}.order must be one of {list(kind.orders)}, got {self.order!r}; "
                            f"try {key}.order={kind.defaults['order']}")
        if steps is not None and self.order > kind.most_order(steps):
            fewest = next(n for n in range(1, 2 * max(kind.orders) + 2) if kind.most_order(n) >= self.order)
            raise UserError(f"{key}.order={self.order} needs {key}.steps >= {fewest} (its first steps warm up and its "
                            f"last lower the order), got {steps} steps; use {key}.order={kind.most_order(steps)} "
                            f"or {key}.steps={fewest}")

    def most_steps(self, num_timesteps: int) -> int:
        """The most steps a model of T steps allows this sampler (T; heun: 2T, its N = (steps+1)//2 <= T)."""
        return SAMPLERS[self.name].most_steps(num_timesteps)

    def check_steps(self, num_timesteps: int, key: str = "sampler") -> "SamplerSpec":
        """Steps set against the model's T (known once the model is): at most most_steps(T); an order the
        (default) steps allow."""
        steps, kind = self.check(key).steps, SAMPLERS[self.name]
        most = self.most_steps(num_timesteps)
        if steps is not None and steps > most:
            fix = f"use {key}.steps={min(kind.defaults.get('steps', 50), most)} or at most {most}"
            if most == num_timesteps:
                raise UserError(f"{key}.steps={steps} exceeds the model's T={num_timesteps} steps; {fix}")
            raise UserError(f"{key}.steps={steps} exceeds what the model's T={num_timesteps} steps allow "
                            f"{key}.name={self.name} ({kind.summary}); {fix}")
        if self.order is not None:
            self._check_order(key, steps if steps is not None else min(kind.defaults["steps"], most))
        return self

    def resolved(self, num_timesteps: int) -> "SamplerSpec":
        """The spec with every setting the sampler uses filled from its defaults (checked first); default steps
        are capped at most_steps(T), a default order at what the steps allow (set ones are checked instead)."""
        self.check_steps(num_timesteps)
        kind = SAMPLERS[self.name]
        filled = {k: v for k, v in kind.defaults.items() if getattr(self, k) is None}
        if "steps" in filled:
            filled["steps"] = min(filled["steps"], self.most_steps(num_timesteps))
        if "order" in filled:
            filled["order"] = min(filled["order"], kind.most_order(filled.get("steps", self.steps)))
        return replace(self, **filled)

    def sampler_kwargs(self, num_timesteps: int) -> dict[str, Any]:
        """The keyword arguments of the sampler function, beyond model, diffusion, x_T and generator."""
        spec = self.resolved(num_timesteps)
        kwargs = {k: getattr(spec, k) for k in SAMPLERS[spec.name].defaults}
        if "steps" in kwargs:
            kwargs["num_steps"] = kwargs.pop("steps")
        return {**kwargs, "clip_denoised": spec.clip_denoised}

    def describe(self, num_timesteps: int) -> dict[str, Any]:
        """What a score's protocol records of the sampler (the steps of ddpm are T). `order` appears only for
        the samplers that take it, so the protocols of ddpm, ddim and respaced are those recorded before."""
        spec = self.resolved(num_timesteps)
        described = {"name": spec.name, "steps": num_timesteps if spec.steps is None else spec.steps,
                     "eta": spec.eta, "spacing": spec.spacing, "clip_denoised": spec.clip_denoised}
        if "order" in SAMPLERS[spec.name].defaults:
            described["order"] = spec.order
        if spec.guidance_scale is not None:  # only when set: unguided protocols stay those recorded before
            described["guidance_scale"] = spec.guidance_scale
        return described

    def nfe(self, num_timesteps: int) -> int:
        """Network evaluations one image costs (ddpm: T; heun: 2N-1; the others: steps)."""
        return SAMPLERS[self.name].nfe(self.describe(num_timesteps)["steps"])

    def label(self, num_timesteps: int) -> str:
        """Short and human: 'ddpm-1000', 'ddim-50 η=0', 'respaced-100', 'unipc-20 order=3'."""
        return sampler_label(self.describe(num_timesteps))

    def tag(self, num_timesteps: int) -> str:
        """A metric-name suffix: 'dpmpp_2m-10', plus each setting that was set away from its default
        ('ddim-10-eta0.5', 'unipc-20-order2', 'heun-9-logsnr', '-noclip')."""
        defaults = SAMPLERS[self.name].defaults
        parts = [f"{self.name}-{self.describe(num_timesteps)['steps']}"]
        for setting in ("eta", "order", "spacing"):
            value = getattr(self, setting)
            if value is not None and value != defaults.get(setting):
                parts.append(value if setting == "spacing" else f"{setting}{value:g}")
        if self.guidance_scale is not None:
            parts.append(f"w{self.guidance_scale:g}")
        return "-".join(parts + ([] if self.clip_denoised else ["noclip"]))


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


def as_sampler_spec(value: "SamplerSpec | Mapping[str, Any] | None", key: str = "sampler",
                    default: SamplerSpec | None = None) -> SamplerSpec:
    """A SamplerSpec from a spec, a mapping of its fields (a plain dict or a config node) or None (the default)."""
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
