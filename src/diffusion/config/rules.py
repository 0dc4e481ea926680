"""Value rules written beside each schema field, checked for every composed config before anything runs.

A field's rule lives in its dataclass as `field(metadata={"rule": Rule})` (`checked(default, rule)` writes that,
diffusion/rules.py), so a setting's type, default and valid values are in one place. OmegaConf checks the types
while Hydra composes; `check_rules` walks the composed config and checks every rule, naming the key, the value and
the fix (the schema's default). Here too: the rules that need Lightning. Cross-field and environment checks live in
validation.py and run/jobs/preflight.py.
"""

from collections.abc import Sequence
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.errors import UserError
from diffusion.rules import REQUIRED, Rule


def devices() -> Rule:
    """Lightning's devices: a count >= 1, -1 (all), "auto", or a list of device indices."""
    def ok(x: Any) -> bool:
        if isinstance(x, bool):
            return False
        if isinstance(x, int):
            return x >= 1 or x == -1
        if isinstance(x, str):
            return x == "auto" or (x.strip().lstrip("-").isdigit() and int(x) >= 1)
        return isinstance(x, Sequence) and len(x) > 0 and all(isinstance(i, int) and i >= 0 for i in x)

    return Rule(ok, "a device count >= 1, -1 (every device), 'auto', or a list of device indices")


def device() -> Rule:
    """A torch device for sampling: auto, cpu, cuda or cuda:N (whether it exists is checked before it is used)."""
    def ok(x: Any) -> bool:
        return isinstance(x, str) and (x in ("auto", "cpu", "cuda", "mps") or
                                       (x.startswith("cuda:") and x[5:].isdigit()))

    return Rule(ok, "auto, cpu, cuda or cuda:N")


def label_choice() -> Rule:
    """Which labels samples of a class-conditional model get: null or balanced (the same count per class), or a
    non-empty list of class indices >= 0 or class names (the model's class count is checked at load)."""
    def ok(x: Any) -> bool:
        if x is None or x == "balanced":
            return True
        return (isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and
                all((isinstance(i, int) and not isinstance(i, bool) and i >= 0) or (isinstance(i, str) and i.strip())
                    for i in x))

    return Rule(ok, "null, balanced, or a list of class indices or class names such as [3,3,7]")


def strategy() -> Rule:
    """A name Lightning's strategy registry knows ("auto", "ddp", "fsdp", ...)."""
    def ok(x: Any) -> bool:
        from lightning.pytorch.strategies import StrategyRegistry

        return x == "auto" or x in StrategyRegistry.available_strategies()

    return Rule(ok, "'auto' or a strategy Lightning knows (ddp, ddp_spawn, fsdp, deepspeed, ...)")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def _fmt(value: Any) -> str:
    """As a Hydra override spells it: [0.9,0.999], null, abc."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if value == "":
        return "''"
    return "null" if value is None else str(value)


def _spelled(value: Any) -> bool:
    """A value a one-line fix can spell on the command line (not a list of config groups)."""
    scalar = (str, int, float, bool, type(None))
    return value is not MISSING and (isinstance(value, scalar) or
                                     (isinstance(value, list | tuple) and all(isinstance(v, scalar) for v in value)))


def _default(f) -> Any:
    if f.default is not MISSING and f.default != REQUIRED:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _rule(schema: type, f) -> Rule | None:
    """The field's rule, or the rule of the field it redefines in a base class (a subclass that only changes the
    default, `channels: int = 1`, keeps the base's rule)."""
    for cls in schema.__mro__:
        if is_dataclass(cls):
            base = next((g for g in fields(cls) if g.name == f.name), None)
            if base is not None and "rule" in base.metadata:
                return base.metadata["rule"]
    return None


def check_rules(cfg: DictConfig, prefix: str = "") -> None:
    """Every rule of every dataclass-typed node below cfg; the first broken one is a one-line UserError."""
    schema = OmegaConf.get_type(cfg)
    if is_dataclass(schema):
        for f in fields(schema):
            rule = _rule(schema, f)
            if rule is None or f.name not in cfg or OmegaConf.is_missing(cfg, f.name):
                continue
            value = _plain(cfg[f.name])
            if not rule.ok(value):
                default = _default(f)
                fix = f"try {prefix}{f.name}={_fmt(default)}" if _spelled(default) and rule.ok(default) \
                    else f"give {prefix}{f.name} {rule.text}"
                raise UserError(f"{prefix}{f.name} must be {rule.text}, got {_fmt(value)}; {fix}")
    for key in cfg.keys():
        if OmegaConf.is_interpolation(cfg, key) or OmegaConf.is_missing(cfg, key):
            continue
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            check_rules(child, f"{prefix}{key}.")
