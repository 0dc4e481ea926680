"""The sampler spec: which sampler draws images, with which settings. One schema for every `sampler` node.

`SamplerSpec` is a plain dataclass. Hydra uses it as the config schema wherever a sampler is chosen
(sample.py, evaluate.py, figures.py, callbacks.samples, callbacks.quality, the sampler table), so the same
keys work everywhere: `sampler.name=ddim sampler.steps=50 sampler.eta=0`. A setting the chosen sampler does
not use stays null, and setting it is an error; `resolved()` fills the settings a sampler uses from
`SAMPLERS`, the one place their defaults are written.
"""

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from diffusion.errors import UserError
from diffusion.sampling.ancestral import SampleOutput, ddim_sample, ddpm_sample, respaced_sample
from diffusion.schedules import SPACINGS

SETTINGS = ("steps", "eta", "spacing")  # what a sampler may or may not use; clip_denoised applies to all


@dataclass(frozen=True)
class SamplerKind:
    """A sampler: its function, the settings it takes with their defaults, and one line on what it is."""

    fn: Callable[..., SampleOutput]
    defaults: Mapping[str, Any]
    summary: str


SAMPLERS: dict[str, SamplerKind] = {
    "ddpm": SamplerKind(ddpm_sample, {}, "ancestral sampling over all T steps (Ho et al. 2020 Algorithm 2)"),
    "ddim": SamplerKind(ddim_sample, {"steps": 50, "eta": 0.0, "spacing": "linspace"},
                        "DDIM over `steps` of the T steps, η=0 deterministic (Song et al. 2021 Eq. 12)"),
    "respaced": SamplerKind(respaced_sample, {"steps": 50, "spacing": "linspace"},
                            "ancestral sampling over `steps` of the T steps (Nichol & Dhariwal 2021 Sec. 4)"),
}


@dataclass
class SamplerSpec:
    """How images are drawn. Settings left null take the sampler's defaults (see SAMPLERS)."""

    name: str = "ddpm"  # ddpm | ddim | respaced
    steps: int | None = None  # sampling steps K of the T (ddim, respaced; default 50, or T if T is smaller)
    eta: float | None = None  # DDIM's η in [0, 1] (ddim; default 0: deterministic)
    spacing: str | None = None  # linspace | leading | trailing: which K of the T steps (ddim, respaced)
    clip_denoised: bool = True  # clamp every predicted x0 to [-1, 1]

    def check(self, key: str = "sampler") -> "SamplerSpec":
        """Raise a one-line UserError naming `key.<field>` for anything wrong; return self."""
        if self.name not in SAMPLERS:
            swapped = [n for n in SAMPLERS if sorted(n) == sorted(str(self.name))]  # letters swapped: ddmi -> ddim
            close = swapped or difflib.get_close_matches(str(self.name), SAMPLERS, n=1)
            hint = f"did you mean {key}.name={close[0]}? " if close else ""
            raise UserError(f"{key}.name={self.name} is not a sampler; {hint}choose one of {list(SAMPLERS)}")
        kind = SAMPLERS[self.name]
        for setting in SETTINGS:
            value = getattr(self, setting)
            if value is not None and setting not in kind.defaults:
                raise UserError(f"{key}.{setting}={value} is not used by {key}.name={self.name} "
                                f"({kind.summary}); {_alternative(key, setting, value)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise UserError(f"{key}.steps must be an integer >= 1, got {self.steps!r}; try {key}.steps=50")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise UserError(f"{key}.eta must be in [0, 1], got {self.eta}; 0 is deterministic DDIM, 1 DDPM-like")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise UserError(f"{key}.spacing={self.spacing} is not a spacing; choose one of {list(SPACINGS)}")
        return self

    def check_steps(self, num_timesteps: int, key: str = "sampler") -> "SamplerSpec":
        """Steps set against the model's T (known once the model is): at most T."""
        steps = self.check(key).steps
        if steps is not None and steps > num_timesteps:
            raise UserError(f"{key}.steps={steps} exceeds the model's T={num_timesteps} steps; "
                            f"use {key}.steps={min(50, num_timesteps)} or at most {num_timesteps}")
        return self

    def resolved(self, num_timesteps: int) -> "SamplerSpec":
        """The spec with every setting the sampler uses filled from its defaults (checked first); default steps
        are capped at the model's T (steps that were set must be at most T: check_steps)."""
        self.check_steps(num_timesteps)
        filled = {k: v for k, v in SAMPLERS[self.name].defaults.items() if getattr(self, k) is None}
        if "steps" in filled:
            filled["steps"] = min(filled["steps"], num_timesteps)
        return replace(self, **filled)

    def sampler_kwargs(self, num_timesteps: int) -> dict[str, Any]:
        """The keyword arguments of the sampler function, beyond model, diffusion, x_T and generator."""
        spec = self.resolved(num_timesteps)
        kwargs = {k: getattr(spec, k) for k in SAMPLERS[spec.name].defaults}
        if "steps" in kwargs:
            kwargs["num_steps"] = kwargs.pop("steps")
        return {**kwargs, "clip_denoised": spec.clip_denoised}

    def describe(self, num_timesteps: int) -> dict[str, Any]:
        """What a score's protocol records of the sampler (the steps of ddpm are T)."""
        spec = self.resolved(num_timesteps)
        return {"name": spec.name, "steps": num_timesteps if spec.steps is None else spec.steps,
                "eta": spec.eta, "spacing": spec.spacing, "clip_denoised": spec.clip_denoised}

    def label(self, num_timesteps: int) -> str:
        """Short and human: 'ddpm-1000', 'ddim-50 η=0', 'respaced-100'."""
        return sampler_label(self.describe(num_timesteps))


def sampler_label(described: Mapping[str, Any]) -> str:
    """The label of a described sampler (SamplerSpec.describe's dict, as protocols store it)."""
    eta = described.get("eta")
    return f"{described['name']}-{described['steps']}" + (f" η={eta:g}" if eta is not None else "")


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
    """The fix for a setting the sampler does not use: the samplers that do (respaced first for steps)."""
    takers = [name for name, kind in SAMPLERS.items() if setting in kind.defaults]
    if setting in ("steps", "spacing") and "respaced" in takers:
        return (f"for ancestral sampling over fewer steps use {key}.name=respaced {key}.{setting}={value}, "
                f"else drop {key}.{setting} (samplers that take it: {takers})")
    return f"use {key}.name={takers[0]} {key}.{setting}={value}, or drop {key}.{setting} (samplers that take it: " \
           f"{takers})"

