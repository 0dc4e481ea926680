"""Every default is written once, in the config schemas (diffusion.config's dataclasses): not again in the signature
of the class or function a schema's `_target_` names, nor in the YAML files that choose the schema; and a command
validates its config once (schema rules, then config/validation.py), so those targets trust what they are given
instead of raising UserErrors of their own. What validation took over from the constructors says the same lines."""

import contextlib
import dataclasses
import inspect
import io
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

import diffusion.config.callbacks
import diffusion.config.entry
import diffusion.config.groups
from diffusion.config import objective_schemas, register_configs, validate
from diffusion.errors import UserError
from diffusion.run.jobs.precheck import CONF_DIR, check_composed, explained
from helpers import train_cfg

SCHEMA_MODULES = (diffusion.config.groups, diffusion.config.callbacks, diffusion.config.entry)


def schemas() -> list[type]:
    """Every dataclass the schema modules define, and the schema each objective's module declares beside it."""
    return [obj for module in SCHEMA_MODULES for obj in vars(module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__] + \
        list(objective_schemas().values())


def targeted() -> list[tuple[type, object]]:
    """(schema, target) for every schema whose `_target_` default names something of this package."""
    found = []
    for schema in schemas():
        target = next((f.default for f in dataclasses.fields(schema) if f.name == "_target_"), None)
        if isinstance(target, str) and target.startswith("diffusion."):
            found.append((schema, get_object(target)))
    return found


TARGETED = targeted()
IDS = [schema.__name__ for schema, _ in TARGETED]


def test_the_walk_finds_the_targets():
    names = {getattr(target, "__qualname__", "") for _, target in TARGETED}
    assert len(TARGETED) >= 20, names
    assert {"DigitsDataModule", "ImageFolderDataModule", "EMA", "SampleQualityCallback", "linear_beta_schedule",
            "DDPM"} <= names


@pytest.mark.parametrize("schema, target", TARGETED, ids=IDS)
def test_a_target_repeats_no_default_of_its_schema(schema, target):
    """A parameter the schema declares has no default in the target's signature: the schema's is the one."""
    declared = {f.name for f in dataclasses.fields(schema)} - {"_target_", "_partial_"}
    restated = [f"{name}={param.default!r}" for name, param in inspect.signature(target).parameters.items()
                if name in declared and param.default is not inspect.Parameter.empty]
    assert not restated, f"{target.__qualname__} restates {schema.__name__}'s defaults: {restated}; make them required"


# Targets whose constructor keeps a UserError, and why (checks of what a config cannot say, read at run time).
KEEPS_USER_ERRORS = {
    "DDPM": "also rebuilt from a checkpoint's or a diffusers folder's objective spec, read at run time (its loss and "
            "timesteps choices)",
    "EDM": "also rebuilt from a checkpoint's or a diffusers folder's objective spec, read at run time (sigma_min "
           "below sigma_max)",
    "Flow": "also rebuilt from a checkpoint's or a diffusers folder's objective spec, read at run time (its "
            "t_distribution, t_min against sigma_max)",
}


def constructor_sources(target) -> dict[str, str]:
    """{name: source} of the target function, or of every __init__ of this package in the target class's MRO."""
    if not isinstance(target, type):
        return {target.__qualname__: inspect.getsource(target)}
    return {f"{cls.__qualname__}.__init__": inspect.getsource(cls.__init__) for cls in target.__mro__
            if cls.__module__.startswith("diffusion.") and "__init__" in vars(cls)}


@pytest.mark.parametrize("schema, target", TARGETED, ids=IDS)
def test_a_target_trusts_its_validated_config(schema, target):
    """No `raise UserError` in the constructor: the schema's rules and validation.py checked the config first."""
    sources = constructor_sources(target)
    raising = sorted(name for name, source in sources.items() if "UserError" in source)
    if target.__qualname__ in KEEPS_USER_ERRORS:
        assert raising, f"{target.__qualname__} no longer raises UserError: drop it from KEEPS_USER_ERRORS"
        return
    assert not raising, f"{raising} re-check {schema.__name__}'s settings; move the check to the schema or validation"


# --- the YAML files ---------------------------------------------------------------------------------------
CONF = Path(CONF_DIR)
GROUPS = ("callbacks", "data", "logger", "model", "objective", "paths", "schedule", "trainer")  # and the entry points
LEFT_OUT = {  # folders of conf/ the YAML check does not read, and why
    "hydra": "Hydra's own settings (run directory, launcher): no schema of ours",
    "experiment": "recipes in the _global_ package: a value equal to a schema's default may undo another option's",
    "debug": "presets in the _global_ package: as experiment/",
}


def yaml_files() -> list[Path]:
    return sorted(CONF.glob("*.yaml")) + [path for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_every_folder_of_conf_is_checked_or_left_out_with_a_reason():
    folders = {path.name for path in CONF.iterdir() if path.is_dir() and not path.name.startswith("__")}
    assert folders == set(GROUPS) | set(LEFT_OUT)


def _base(path: Path) -> DictConfig | None:
    """What a YAML's own keys are merged over: the schema its defaults list names (base_<group>...), with the
    options of its group it extends (model/mnist.yaml: small32) merged over it; None for a _global_ package."""
    if "# @package _global_" in path.read_text():
        return None
    group = path.parent.relative_to(CONF).as_posix()
    prefix = "" if group == "." else f"{group}/"
    base = None
    for entry in OmegaConf.load(path).get("defaults", []):
        if not isinstance(entry, str) or entry == "_self_":
            continue  # group choices of an entry point ({data: digits}) and overrides are other files' keys
        if entry in {Path(name).stem for name in ConfigStore.instance().list(group if prefix else "")}:
            node = ConfigStore.instance().load(f"{prefix}{entry}.yaml").node
        else:
            parent = path.parent / f"{entry}.yaml"
            node = OmegaConf.merge(_base(parent), _own(parent))
        base = node if base is None else OmegaConf.merge(base, node)
    assert base is not None, f"{path.relative_to(CONF)} names no schema in its defaults list"
    return base


def _own(path: Path) -> DictConfig:
    own = OmegaConf.load(path)
    for key in ("defaults", "hydra"):
        own.pop(key, None)
    return own


def _raw(node):
    """A node's value as written (an interpolation as its ${...} text)."""
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()


def restated(base: DictConfig, own: DictConfig, prefix: str = "") -> list[str]:
    """The keys of `own` whose value is the one `base` already has (a key required in base, ???, is none)."""
    found = []
    for key in own.keys():
        if key not in base or OmegaConf.is_missing(base, key):
            continue
        mine, theirs = own._get_node(key), base._get_node(key)
        if OmegaConf.is_dict(mine) and OmegaConf.is_dict(theirs) and not theirs._is_none():
            found += restated(theirs, mine, f"{prefix}{key}.")
        elif _raw(mine) == _raw(theirs):
            found.append(f"{prefix}{key}: {_raw(mine)!r}")
    return found


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CONF)))
def test_no_yaml_restates_a_schema_default(path):
    register_configs()
    base = _base(path)
    if base is None:
        return
    found = restated(base, _own(path))
    assert not found, f"{path.relative_to(CONF)} restates its schema's defaults (drop them): {found}"


# --- what validation took over from the constructors: the same one line, before anything is built ---------
def _entry_point_says(entry: str, *overrides: str) -> str:
    """The line the entry point's precheck prints for this composed command line (as fuzz_cases.outcome runs it)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=list(overrides))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as ex:
        explained(entry, lambda: check_composed(entry, cfg))
    assert ex.value.code == 2
    return err.getvalue().strip()


TRAIN, CKPT = ("debug=fast", "logger=none"), ("ckpt=/nonexistent/last.ckpt",)
MOVED = [  # (entry point, overrides, the line it printed when the constructors checked these)
    ("train", (*TRAIN, "data.channels=3"),
     "error: data.channels=3, but digits images have channels 1; drop data.channels or set data.channels=1"),
    ("train", (*TRAIN, "data.image_size=16"),
     "error: data.image_size=16, but digits images have image_size 8; drop data.image_size or set data.image_size=8"),
    ("train", (*TRAIN, "data.random_flip=true"),
     "error: data.random_flip=true would mirror digits into other symbols; set data.random_flip=false"),
    ("train", (*TRAIN, "data=fashion_mnist", "data.channels=3", "model.in_channels=3"),
     "error: data.channels=3, but Fashion-MNIST images have channels 1; drop data.channels or set data.channels=1"),
    ("train", (*TRAIN, "data=cifar10", "data.image_size=64"),
     "error: data.image_size=64, but CIFAR-10 images have image_size 32; drop data.image_size or set "
     "data.image_size=32"),
    ("train", (*TRAIN, "data=image_folder", "data.root=/nonexistent", "data.download=true"),
     "error: data.download=true: an image folder cannot be downloaded; set data.download=false"),
    ("train", (*TRAIN, "schedule.beta_start=0.02", "schedule.beta_end=0.01"),
     "error: objective: schedule.beta_end must be in (beta_start=0.02, 1), got 0.01; try schedule.beta_end=0.04"),
    ("train", (*TRAIN, "schedule=quadratic", "schedule.beta_start=0.01", "schedule.beta_end=0.005"),
     "error: objective: schedule.beta_end must be in (beta_start=0.01, 1), got 0.005; try schedule.beta_end=0.02"),
    ("train", (*TRAIN, "model.ch=30"),
     "error: model.ch=30 is not a multiple of model.num_groups=8 (GroupNorm needs whole groups) or is below 4; use a "
     "ch that is a multiple of 8 or lower num_groups"),
    ("train", (*TRAIN, "model.attn_resolutions=[4,5]"),
     "error: model.attn_resolutions=[4, 5] holds 5, which never occurs in this U-Net, whose resolutions are "
     "[8, 4, 2]; pick attn_resolutions from those"),
    ("train", (*TRAIN, "model.ch_mult=[1,2,2,2,2]"),
     "error: model.image_size=8 is not divisible by the U-Net's total downsampling 16 (ch_mult has 5 levels); use an "
     "image size that is a multiple of 16 or fewer ch_mult levels"),
    ("train", (*TRAIN, "callbacks.posthoc_ema.sigma_rels=[0.05,0.05]"),
     "error: callbacks.posthoc_ema.sigma_rels must be distinct widths in (0, 0.2887], got [0.05, 0.05]; try "
     "callbacks.posthoc_ema.sigma_rels=[0.05,0.10]"),
    ("evaluate", (*CKPT, "logger=none", "data=mnist", "data.channels=3"),
     "error: data.channels=3, but MNIST images have channels 1; drop data.channels or set data.channels=1"),
    ("figures", (*CKPT, "data.random_flip=true"),
     "error: data.random_flip=true would mirror digits into other symbols; set data.random_flip=false"),
]


@pytest.mark.parametrize("entry, overrides, line", MOVED,
                         ids=[f"{e} {' '.join(x for x in o if x not in {*TRAIN, *CKPT})}" for e, o, _ in MOVED])
def test_checks_moved_into_validation_say_what_the_constructors_said(entry, overrides, line):
    assert _entry_point_says(entry, *overrides) == line


def test_a_ddp_worker_s_untyped_config_validates_too(tmp_path):
    """A DDP worker validates the resolved config rank 0 wrote, without schema types: it passes, and the checks
    that need no schema still refuse."""
    def untyped(*overrides: str) -> DictConfig:
        return OmegaConf.create(OmegaConf.to_container(train_cfg(tmp_path, "logger=none", *overrides), resolve=True))

    validate(untyped())
    cfg = untyped()
    cfg.data.random_flip = True
    with pytest.raises(UserError, match="would mirror digits into other symbols"):
        validate(cfg)
