"""Compose and check a command line before Hydra starts the job: every mistake one line (what, value, fix).

Hydra reports composition problems (unknown key, wrong type, unknown group option) as several lines of
text; `precheck` composes the command line first through the compose API and rewrites such failures as
one line. HYDRA_FULL_ERROR=1 shows every traceback instead.
"""

import difflib
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from diffusion import config
from diffusion.config import MOVED_KEYS, register_configs, validate_entry
from diffusion.core.sampling import SamplerSpec
from diffusion.errors import UserError
from diffusion.run.jobs.console import fail, full_errors

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")  # shipped inside the package


def jobs_to_check(overrides: list[str]) -> list[list[str]]:
    """Command lines that together try every value of every sweep (a,b,c) once, the others at their first."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[o.input_line] if not o.is_sweep_override() else
              [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    first = [v[0] for v in values]
    jobs = [first]
    for i, choices in enumerate(values):
        jobs += [first[:i] + [choice] + first[i + 1:] for choice in choices[1:]]
    return jobs


def _overrides(argv: list[str]) -> list[str]:
    """The command line's overrides: Hydra's flags (and the values some take) left out."""
    skip_next, out = False, []
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                     "--config-path", "-cp", "--info", "-i"):
            skip_next = arg not in ("--info", "-i")
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _user_overrides(argv: list[str]) -> list[str]:
    """Overrides of the config itself (not Hydra's settings or hydra/... groups)."""
    return [a for a in _overrides(argv) if not a.lstrip("+~").startswith("hydra")]


def explain(err: Exception, cfg_keys: Callable[[str], list[str]]) -> str:
    """One line for a Hydra/OmegaConf composition error: the key or option, the value, the fix."""
    text = str(err) if err.__cause__ is None else f"{err}\n{err.__cause__}"
    if isinstance(err, MissingConfigException) or "Could not find '" in text:
        m = re.search(r"Could not find '([^']+)/([^']+)'", text)
        options = [o for o in re.findall(r"^\t(\S+)$", text, flags=re.M) if not o.startswith("base_")]
        if m:
            return (f"{m.group(1)}={m.group(2)} is not an option of group '{m.group(1)}'; "
                    f"choose one of {options}")
    m = re.search(r"Key '([^']+)' is not in struct\s+full_key: (\S+)", text) or re.search(
        r"Could not (?:override|append to config)[^']*'([^']+)'", text)
    if m:
        key = m.group(2) if m.lastindex and m.lastindex >= 2 else m.group(1)
        parent, _, leaf = key.rpartition(".")
        prefix = f"{parent}." if parent else ""
        if leaf in SamplerSpec.__dataclass_fields__ and "sampler" in cfg_keys(parent):
            return (f"unknown config key '{key}'; sampler settings are under {prefix}sampler: write "
                    f"{prefix}sampler.{leaf}=... (e.g. {prefix}sampler.name=ddim {prefix}sampler.steps=50)")
        close = difflib.get_close_matches(leaf, cfg_keys(parent), n=1)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
            f"valid keys here: {cfg_keys(parent)}"
        return f"unknown config key '{key}' (the schema has no such field, '+' cannot add one); {hint}"
    typed = _type_mismatch(text)
    merging = re.search(r"Error merging override ([^=\s]+)=(\S*)", text)
    if merging and "is not a valid bool" in text:
        key, value = merging.groups()
        if _allows_null(text, key):
            return (f"{key} must be true, false or null, got {value or repr('')}; use {key}=true, {key}=false or "
                    f"{key}=null")
        return f"{key} must be true or false, got {value or repr('')}; use {key}=true or {key}=false"
    if merging and "is not a ListConfig, list or tuple" in text:
        key, value = merging.groups()
        return f"{key} must be a list, got {value or repr('')}; write it in brackets: {key}=[a,b,...]"
    if typed and typed[1] == SamplerSpec.__name__:
        value, _, key = typed
        return (f"{key}={value}: {key} is a group of settings; write {key}.name={value} "
                f"(and {key}.steps=..., {key}.eta=... where the sampler takes them)")
    if typed:
        value, kind, key = typed
        return f"{key} must be of type {kind}, got {value!r}; fix the value's type"
    m = re.search(r"Missing mandatory value: (\S+)", text)
    if m:
        return f"{m.group(1)} has no value and is required; set {m.group(1)}=..."
    return " ".join(text.split())


def _allows_null(text: str, key: str) -> bool:
    """Whether the schema OmegaConf names (`object_type=...`) declares the key's field Optional."""
    m = re.search(r"object_type=(\w+)", text)
    schema = getattr(config, m.group(1), None) if m else None
    fields = getattr(schema, "__dataclass_fields__", {})
    leaf = key.rpartition(".")[2]
    return leaf in fields and type(None) in typing.get_args(fields[leaf].type)


def _type_mismatch(text: str) -> tuple[str, str, str] | None:
    """(value, expected type, key) from OmegaConf's messages for a value of the wrong type, else None."""
    for pattern, order in ((r"Value '([^']*)'.*?could not be converted to (\w+)\s+full_key: (\S+)", (1, 2, 3)),
                           (r"Value '([^']*)'.*?is not a subclass of (\w+)\s+full_key: (\S+)", (1, 2, 3)),
                           (r"Invalid type assigned: \w+ is not a subclass of (\w+)\. value: (\S*)\s+full_key: (\S+)",
                            (2, 1, 3))):
        m = re.search(pattern, text, flags=re.S)
        if m:
            return m.group(order[0]), m.group(order[1]), m.group(order[2])
    return None


def precheck(config_name: str, argv: list[str]) -> DictConfig | None:
    """Compose the command line (every sweep value once); exit with a one-line message if it does not compose."""
    register_configs()
    multirun = "-m" in argv or "--multirun" in argv

    def check_every_job() -> DictConfig:
        global _checked_here
        _check_readable(_overrides(argv))
        _check_moved(_user_overrides(argv))
        here = True
        for i, overrides in enumerate(jobs_to_check(_user_overrides(argv))):
            # The first job is composed with Hydra's own settings too, to check the run directory once and to
            # see whether the jobs run here or on other machines (a SLURM launcher: their GPUs are not ours).
            cfg, here = _check_one(config_name, overrides, _hydra_overrides(argv) if i == 0 else None, multirun, here)
        _checked_here = here
        return cfg

    return explained(config_name, check_every_job)


_checked_here = False  # whether this process's precheck validated every job with this machine's environment


def checked_here() -> bool:
    """Whether the jobs of this process's command line were validated in full here (precheck, every job, with this
    machine's devices): a job need not validate its config again. False in a job that runs elsewhere (a SLURM job
    validates there, once) or when train() is called without the entry point."""
    return _checked_here


def _check_readable(overrides: list[str]) -> None:
    """An override Hydra's grammar cannot read because its value holds '=', ',' or brackets unquoted (a path into
    a sweep's job folder, `1_objective=edm,seed=0/...`) is named with its quoted spelling."""
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except HydraException:
            key, _, value = override.partition("=")
            if value and not value.startswith(("'", '"')) and re.search(r"[=,\[\]{}()\s]", value):
                raise UserError(f"{key}={value} cannot be read: Hydra takes '=', ',', brackets or spaces in a value "
                                f"only quoted; write {key}='{value}' (in a shell: \"{key}='{value}'\")") from None
            raise


def _check_moved(overrides: list[str]) -> None:
    """A key that moved (diffusion.parameterization is objective.parameterization now) is named with its new place."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in MOVED_KEYS:
            new = MOVED_KEYS[key]
            raise UserError(f"{key} moved to {new} (DDPM's settings live in the objective group now, the others in "
                            f"training); write {new}={value}")


def explained(config_name: str, check: Callable[[], DictConfig]) -> DictConfig | None:
    """check(); a composition or validation error becomes one line on stderr and exit status 2."""
    try:
        return check()
    except UserError as err:
        if full_errors():
            raise
        fail(str(err))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if full_errors():
            raise
        fail(explain(err, lambda parent: _keys_of(config_name, parent)))


def _hydra_overrides(argv: list[str]) -> list[str]:
    """The command line's settings of Hydra itself (hydra.run.dir=..., hydra/launcher=...), sweeps left out."""
    args = [a for a in _overrides(argv) if a.lstrip("+~").startswith("hydra")]
    parsed = OverridesParser.create().parse_overrides(args)
    return [o.input_line for o in parsed if not o.is_sweep_override()]


def _check_one(config_name: str, overrides: list[str], hydra_overrides: list[str] | None = None,
               multirun: bool = False, here: bool = True) -> tuple[DictConfig, bool]:
    """Compose one job's config and check it: no key outside the schema, no missing value, every rule; with
    hydra_overrides, also that the run (or sweep) directory can be created and whether the job runs here."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*overrides, *(hydra_overrides or [])],
                      return_hydra_config=hydra_overrides is not None)
    if hydra_overrides is not None:
        _check_output_dir(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
        here = not (multirun and "slurm" in str(OmegaConf.select(cfg, "hydra.launcher._target_")).lower())
        with open_dict(cfg):
            del cfg["hydra"]
    return check_composed(config_name, cfg, here), here


def check_composed(config_name: str, cfg: DictConfig, here: bool = True) -> DictConfig:
    """Check a composed job config: no key outside the schema, no missing value, every rule (here=False: the job
    runs on another machine, whose devices are checked when it starts there)."""
    unknown = _keys_outside_schema(cfg)
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}' (the schema has no such field, '+' cannot add one); "
                        f"see `python {config_name}.py --cfg job` for the valid keys")
    missing = _missing_keys(cfg)
    if missing:
        raise UserError(f"{missing[0]} has no value and is required; set {missing[0]}=...")
    validate_entry(config_name, cfg, here)
    return cfg


def _check_output_dir(cfg: DictConfig, key: str) -> None:
    """The run (or sweep) directory Hydra is about to create can be created: its nearest existing folder is
    writable. (Hydra would otherwise fail with a traceback before the job starts.)"""
    try:
        folder = Path(str(OmegaConf.select(cfg, key))).expanduser().absolute()
    except (OmegaConfBaseException, ValueError):
        return  # a directory that only Hydra's runtime can resolve: Hydra reports it
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"{key}={folder} cannot be created ({existing} is not a writable folder); run from a "
                        f"folder you can write, or set {key}=<a writable folder>")


def _keys_outside_schema(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that `+key=value` added to a dataclass-backed node (Hydra lets '+' bypass the schema)."""
    schema = OmegaConf.get_type(node)
    fields = getattr(schema, "__dataclass_fields__", None)
    out = [f"{prefix}{k}" for k in node.keys() if fields is not None and k not in fields]
    for key in node.keys():
        if not OmegaConf.is_interpolation(node, key) and isinstance(node._get_node(key), DictConfig):
            out.extend(_keys_outside_schema(node._get_node(key), f"{prefix}{key}."))
    return out


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is ??? (without resolving interpolations, which need Hydra's runtime)."""
    out = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(full)
        elif not OmegaConf.is_interpolation(node, key) and isinstance(node._get_node(key), DictConfig):
            out.extend(_missing_keys(node._get_node(key), full + "."))
    return out


def _keys_of(config_name: str, parent: str) -> list[str]:
    """The keys of a config node in the default composition, for 'did you mean' hints."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # only a hint: never hide the real error behind a second one
        return []
