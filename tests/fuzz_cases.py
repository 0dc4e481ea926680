"""Bad values for every leaf of every entry point's composed config, and what the entry point makes of each.

`cases()` walks each composed config (train.py with debug=fast, sample.py, evaluate.py, figures.py) and, by the
leaf's type, proposes values a user could mistype: wrong type, negative, zero, huge, empty, a typo'd choice.
`outcome()` runs the entry point's own checks in-process: the base command line is composed once per entry point
and each bad value applied to a copy the way Hydra applies a value override after composing (its own
`_apply_overrides_to_config`), then run/jobs/precheck.py's `check_composed` and `explained`, what `precheck` runs before
Hydra starts a job. `full_outcome()` is `precheck` itself, for a sample that the test compares. ACCEPTED states,
with a reason, every (key, value) that is valid and must pass.
Used by tests/test_config_fuzz.py and docs/bad_input_table.py (which writes docs/bad_inputs.md).
"""

import contextlib
import copy
import fnmatch
import functools
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from diffusion.config import register_configs
from diffusion.run.jobs.precheck import CONF_DIR, check_composed, explained, precheck

_FILE = Path(tempfile.mkdtemp(prefix="fuzz-")) / "last.ckpt"  # export.py checks that its checkpoint exists
_FILE.touch()
BASE = {  # what each entry point needs to compose; the checkpoint is read by the job, after these checks
    "train": ["debug=fast", "logger=none"],
    "sample": ["ckpt=/nonexistent/last.ckpt"],
    "evaluate": ["ckpt=/nonexistent/last.ckpt", "logger=none"],
    "figures": ["ckpt=/nonexistent/last.ckpt"],
    "export": [f"ckpt={_FILE}", f"out={_FILE.parent}/exported"],
}
SKIP = ("hydra.*", "*._partial_", "paper_card.*", "ckpt", "ckpt_path", "paths.*", "*output_dir", "*.save_dir", "out",
        "*.dirpath", "data.root", "shards.dir")  # paths: existence and writability checked when used (test_preflight)

BY_TYPE = {
    "int": ["-1", "0", "10000000000000", "abc"],
    "float": ["-1.0", "0.0", "1e30", "abc"],
    "bool": ["maybe"],
    "str": ["''", "typo_x"],
    "list": ["[]", "notalist"],
    "any": ["-5", "abc"],
}

# (key pattern, value, why it is valid): every other (key, value) tried must be refused in one line.
ACCEPTED = [
    *((f"callbacks.{c}.every_n_steps", "0", "0 switches the periodic work off (the final one stays, if any)")
      for c in ("samples", "quality", "figures")),
    ("*every_n_train_steps", "0", "0: only last.ckpt"),
    ("*every_n_steps", "10000000000000", "a period longer than the run: the work happens only at the end"),
    ("*every_n_train_steps", "10000000000000", "a period longer than the run: only last.ckpt"),
    ("trainer.max_steps", "10000000000000", "a long budget; a run stops earlier with Ctrl-C and resumes"),
    ("trainer.max_epochs", "-1", "-1: no epoch limit (steps bound the run)"),
    ("trainer.max_epochs", "0", "0 epochs: nothing to train, Lightning stops at once (a dry run)"),
    ("trainer.max_epochs", "10000000000000", "no practical epoch limit"),
    ("trainer.log_every_n_steps", "10000000000000", "logs only at epoch ends"),
    ("trainer.val_check_interval", "10000000000000", "validates only at the end of training"),
    ("trainer.num_sanity_val_steps", "-1", "-1: Lightning's sanity check over the whole val set"),
    ("trainer.num_sanity_val_steps", "10000000000000", "the sanity check runs over every val batch"),
    ("trainer.gradient_clip_val", "0.0", "0: no clipping"),
    ("trainer.gradient_clip_val", "1e30", "a bound that never clips"),
    ("*seed", "0", "seed 0 is a seed"),
    ("training.max_prior_bpd", "1e30", "a limit no chain exceeds: the check is off, as with null"),
    ("objective.vlb_weight", "0.0", "0: the hybrid loss reduces to L_simple"),
    ("objective.vlb_weight", "1e30", "an extreme but well-defined weighting"),
    ("objective.min_snr_gamma", "1e30", "γ above every SNR: no clipping, plain SNR weighting"),
    ("optim.optimizer.weight_decay", "0.0", "no weight decay (the paper's)"),
    ("optim.optimizer.weight_decay", "1e30", "an extreme but well-defined decay"),
    ("optim.optimizer.eps", "1e30", "an extreme but well-defined epsilon"),
    ("optim.optimizer.lr", "1e30", "an absurd but well-defined rate (training.on_nonfinite stops the run)"),
    ("schedule.s", "1e30", "an extreme cosine offset: ᾱ stays near 1 (a valid, useless schedule)"),
    ("schedule.steepness", "1e30", "a step-function sigmoid schedule"),
    ("validation.bpd_images", "0", "0 switches the val bits/dim off"),
    ("validation.bpd_images", "10000000000000", "every image of the first val batch"),
    ("data.num_workers", "0", "0: load in the main process"),
    ("model.dropout", "0.0", "no dropout"),
    ("*max_reference_images", "10000000000000", "the whole split (fewer images exist)"),
    ("num_samples", "10000000000000", "many samples: long, but what was asked"),
    ("callbacks.samples.num_samples", "10000000000000", "many samples: long, but what was asked"),
    ("callbacks.quality.num_samples", "10000000000000", "many samples: long, but what was asked"),
    ("callbacks.figures.num_samples", "10000000000000", "many samples: long, but what was asked"),
    ("batch_size", "10000000000000", "chunks larger than the sample count: one chunk"),
    ("bpd.batch_size", "10000000000000", "one batch of every image"),
    ("callbacks.quality.batch_size", "10000000000000", "one chunk of every sample"),
    ("*num_images", "10000000000000", "every image of the split"),
    ("*num_reconstructions", "10000000000000", "many completions: long, but what was asked"),
    ("*num_lambdas", "10000000000000", "many interpolation weights: long, but what was asked"),
    ("callbacks.checkpoint.save_top_k", "-1", "-1: keep every periodic checkpoint"),
    ("callbacks.checkpoint.save_top_k", "0", "0: keep none but last.ckpt"),
    ("callbacks.checkpoint.save_top_k", "10000000000000", "keep every periodic checkpoint"),
    ("callbacks.checkpoint.filename", "typo_x", "a file name without the step (each overwrites the last)"),
    ("callbacks.ddp_check.every_n_steps", "10000000000000", "checks only at the end of fit"),
    ("name", "typo_x", "a free-form run name"),
    ("logger.project", "typo_x", "a W&B project name"),
    ("*.group", "typo_x", "a W&B group name"),
    ("*.tags", "[]", "no tags"),
    ("*feature_extractor.cache_dir", "typo_x", "a relative cache folder (created)"),
    ("*feature_extractor.cache_dir", "''", "'': the default cache folder ($XDG_CACHE_HOME/diffusion)"),
    ("*feature_extractor.weights_path", "''", "'': the default Inception weights file (torch hub's cache)"),
    ("*fd_dinov2.weights_path", "''", "'': the default DINOv2 weights file (torch hub's cache), when enabled"),
    ("optim.lr_scheduler.end_factor", "0.0", "LinearLR may decay to 0"),
    ("optim.lr_scheduler.total_iters", "10000000000000", "a warm-up longer than the run: the rate rises throughout"),
    ("trainer.num_sanity_val_steps", "0", "0: no sanity check"),
    ("trainer.check_val_every_n_epoch", "10000000000000", "validation (and its metrics) never runs in practice"),
    ("callbacks.ema.decay", "0.0", "decay 0: the EMA follows the raw weights"),
    *((f"callbacks.{c}.sampler.eta", "0.0", "η = 0: deterministic DDIM") for c in ("samples", "quality")),
    ("*feature_extractor.target", "''", "'': no target (as null; only name=module reads it)"),
    ("*rd_images", "10000000000000", "every image of the split"),
    ("sampler_table.num_samples", "10000000000000", "many samples: long, but what was asked"),
    *((f"{k}_steps", "[]", "[]: the default steps (as null)")
      for k in ("forward", "reverse", "reconstruction", "interpolation")),
    ("model.attn_resolutions", "[]", "a U-Net without attention"),
    ("callbacks.quality.extra_samplers", "[]", "no extra samplers (the default)"),
    ("ema.snapshot_dir", "''", "'': the default folder (<run>/posthoc_ema), as null"),
    ("training.cond_drop_prob", "0.0", "0: labels never dropped (a conditional model that cannot be guided)"),
    ("sampler.guidance_scale", "0.0", "w = 0: the unconditional pass of a class-conditional model (checked at load)"),
    # sample.py, evaluate.py, figures.py: no sampler.name is the checkpoint's own sampler (DDPM's ancestral, EDM's
    # Heun, flow's Euler), known when the checkpoint is read; these values are valid for some sampler and are
    # checked against that one then, before the first image (test_objective_samplers, test_cli)
    ("sampler.steps", "10000000000000", "steps for the checkpoint's own sampler: checked against it at load"),
    ("sampler.eta", "1e30", "η >= 0 is dpmpp_2m_sde's range: checked against the checkpoint's own sampler at load"),
    ("sampler.eta", "0.0", "η = 0: deterministic DDIM (checked against the checkpoint's own sampler at load)"),
]


@dataclass(frozen=True)
class Case:
    entry: str
    key: str
    value: str

    @property
    def override(self) -> str:
        return f"{self.key}={self.value}"


def _kind(node) -> str | None:
    if isinstance(node, ListConfig):
        return "list"
    if isinstance(node, BooleanNode):
        return "bool"
    if isinstance(node, IntegerNode):
        return "int"
    if isinstance(node, FloatNode):
        return "float"
    if isinstance(node, StringNode):
        return "str"
    if isinstance(node, DictConfig):
        return None
    return "any"


def _leaves(node: DictConfig, prefix: str = ""):
    for key in node.keys():
        child = node._get_node(key)
        full = f"{prefix}{key}"
        if isinstance(child, DictConfig) and not child._is_none() and not OmegaConf.is_interpolation(node, key):
            yield from _leaves(child, full + ".")
        elif (kind := _kind(child)) is not None:
            yield full, kind


def cases(entries=tuple(BASE)) -> list[Case]:
    """Every (entry point, leaf, bad value) tried."""
    register_configs()
    found = []
    for entry in entries:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=entry, overrides=BASE[entry])
        for key, kind in _leaves(cfg):
            if not any(fnmatch.fnmatch(key, pattern) for pattern in SKIP):
                found += [Case(entry, key, value) for value in BY_TYPE[kind]]
    return found


def accepted_reason(case: Case) -> str | None:
    """Why this (key, value) is valid, if ACCEPTED says it is."""
    for pattern, value, why in ACCEPTED:
        if value == case.value and fnmatch.fnmatch(case.key, pattern):
            return why
    return None


def _exit_of(check) -> tuple[int, str]:
    """(exit status, stderr) of check(): 0 and "" when it passes."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            check()
        except SystemExit as exit_:
            return int(exit_.code), err.getvalue()
    return 0, err.getvalue()


@functools.cache
def _composed(entry: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=entry, overrides=BASE[entry])


@functools.cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def outcome(case: Case) -> tuple[int, str]:
    """(exit status, stderr) of the entry point's checks with the case's value: 0 and "" when it accepts."""
    cfg = copy.deepcopy(_composed(case.entry))

    def check() -> DictConfig:
        ConfigLoaderImpl._apply_overrides_to_config(_parser().parse_overrides([case.override]), cfg)
        return check_composed(case.entry, cfg)

    return _exit_of(lambda: explained(case.entry, check))


def full_outcome(case: Case) -> tuple[int, str]:
    """The same through `precheck`, which composes the whole command line again (slower)."""
    return _exit_of(lambda: precheck(case.entry, [*BASE[case.entry], case.override]))
