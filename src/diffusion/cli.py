"""Entry-point helpers: turn every user mistake into one line (what, value, fix) and a non-zero exit.

Hydra reports composition problems (unknown key, wrong type, unknown group option) as several lines of
text; `precheck` composes the command line first through the compose API and rewrites such failures as
one line. HYDRA_FULL_ERROR=1 shows every traceback instead.
"""

import difflib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion.config import register_configs, validate_entry
from diffusion.errors import Interrupted, UserError
from diffusion.sampling import SamplerSpec

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(message: str) -> None:
    """Print one line to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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


def _user_overrides(argv: list[str]) -> list[str]:
    """Overrides of the config itself (not Hydra's flags or hydra/... groups)."""
    skip_next, out = False, []
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                     "--config-path", "-cp", "--info", "-i"):
            skip_next = arg not in ("--info", "-i")
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra"):
            out.append(arg)
    return out


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
    try:
        for overrides in jobs_to_check(_user_overrides(argv)):
            cfg = _check_one(config_name, overrides)
        return cfg
    except UserError as err:
        fail(str(err))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if full_errors():
            raise
        fail(explain(err, lambda parent: _keys_of(config_name, parent)))


def _check_one(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose one job's config and check it has no key outside the schema and no missing value."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    unknown = _keys_outside_schema(cfg)
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}' (the schema has no such field, '+' cannot add one); "
                        f"see `python {config_name}.py --cfg job` for the valid keys")
    missing = _missing_keys(cfg)
    if missing:
        raise UserError(f"{missing[0]} has no value and is required; set {missing[0]}=...")
    validate_entry(config_name, cfg)
    return cfg


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


def guarded(fn: Callable[[DictConfig], object], cfg: DictConfig):
    """Run fn(cfg); a UserError becomes one line on stderr and exit status 2 (HYDRA_FULL_ERROR=1: traceback).

    The job's status.json (diffusion.run.job_status) records how it ended. Under -m a failed job does not stop
    the sweep: its line is printed, the next job runs, and the sweep ends with the first failure's line."""
    from diffusion.run.job_status import JobStatus  # here, not above: importing run/ loads torch and Lightning

    status = JobStatus()
    try:
        result = fn(cfg)
        status.finished()
        return result
    except Interrupted as err:
        # The job's own overrides (under -m or submitit, sys.argv is the sweep's or submitit's command line)
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        task = list(HydraConfig.get().overrides.task) if multirun else sys.argv[1:]
        overrides = [a for a in task if not a.startswith("ckpt_path=")]
        script = Path(sys.argv[0]).name if sys.argv[0].endswith(".py") and "submitit" not in sys.argv[0] else "train.py"
        resume = f"python {script} {' '.join(overrides)} ckpt_path={err.checkpoint}"
        status.interrupted(err, resume)
        print(f"error: {err}; resume with: {resume}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        user_error = _user_error_in(err)
        status.failed(user_error or err)
        if user_error is None or full_errors():
            raise
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"error: {user_error}", file=sys.stderr)
            job = HydraConfig.get().job
            raise SweepJobFailed(f"error: job {job.num} ({job.override_dirname}) failed: {user_error}") from None
        fail(str(user_error))


class SweepJobFailed(CompactHydraException):
    """A job of a multirun that failed with a UserError: Hydra runs the other jobs, then prints this one line."""


def _user_error_in(err: BaseException | None) -> UserError | None:
    """The UserError itself or the one that caused it (hydra.utils.instantiate wraps what targets raise)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__
    return None
