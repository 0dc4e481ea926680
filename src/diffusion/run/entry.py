"""The entry points: `python train.py ...` in a clone and `diffusion-train ...` after `pip install .` both run
these. Each composes and checks its command line first (cli.precheck: one line and exit 2 for a mistake), then
runs its command under Hydra, which writes the run folder, and ends as cli.guarded says.

The commands are imported when the job starts, not here. The check itself needs the data modules' classes and the
scores' registry, so a mistake is answered after Lightning and torchmetrics are imported (about 6 s on a 2-core CPU).
"""

# ruff: noqa: E402 (the slow imports come after end_on_signals(): Ctrl-C during them is one line, not a traceback)
import sys

from diffusion.run.jobs.stopping import INTACT, end_on_signals, stop_on_signals

end_on_signals()

import hydra
from omegaconf import DictConfig

from diffusion.errors import Interrupted, UserError
from diffusion.run.jobs.console import fail
from diffusion.run.jobs.guard import guarded
from diffusion.run.jobs.precheck import precheck

CONF = "../conf"  # src/diffusion/conf, shipped inside the package (the repository's conf/ links to it)


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def _train(cfg: DictConfig):
    from diffusion.run.commands.train import objective, train

    # The value of cfg.optimized_metric (what a sweeper such as Optuna optimizes), else None; for a job of a sweep
    # run again that finished before, the value its status.json recorded.
    return guarded(lambda c: objective(c, train(c)), cfg, lambda c, status: objective(c, status.get("metrics", {})))


@hydra.main(version_base="1.3", config_path=CONF, config_name="sample")
def _sample(cfg: DictConfig):
    from diffusion.run.commands.sample import sample

    return guarded(sample, cfg)


@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def _evaluate(cfg: DictConfig):
    from diffusion.run.commands.evaluate import evaluate

    return guarded(evaluate, cfg)


@hydra.main(version_base="1.3", config_path=CONF, config_name="figures")
def _figures(cfg: DictConfig):
    from diffusion.run.commands.figures import figures

    return guarded(figures, cfg)


@hydra.main(version_base="1.3", config_path=CONF, config_name="export")
def _export(cfg: DictConfig):
    from diffusion.run.commands.export import export

    return guarded(export, cfg)


@hydra.main(version_base="1.3", config_path=CONF, config_name="prepare")
def _prepare(cfg: DictConfig):
    from diffusion.run.commands.prepare import prepare

    return guarded(prepare, cfg)


def train_main() -> None:
    """Train a DDPM: train.py [experiment=digits] [group=option] [key=value] ... (-m to sweep)."""
    precheck("train", sys.argv[1:])
    _train()


def sample_main() -> None:
    """Sample a trained model: sample.py ckpt=PATH [num_samples=N] [sampler.name=ddim] [sampler.steps=K]."""
    precheck("sample", sys.argv[1:])
    _sample()


def evaluate_main() -> None:
    """Evaluate a checkpoint: evaluate.py ckpt=PATH [num_samples=N] [sampler.name=ddim sampler.steps=50]."""
    precheck("evaluate", sys.argv[1:])
    _evaluate()


def figures_main() -> None:
    """The paper's figures of a trained model: figures.py ckpt=PATH [data=digits] [output_dir=DIR]."""
    precheck("figures", sys.argv[1:])
    _figures()


def export_main() -> None:
    """Export a trained model for diffusers: export.py ckpt=PATH out=DIR [weights=ema|raw]."""
    precheck("export", sys.argv[1:])
    _export()


def prepare_main() -> None:
    """Write a data set as LitData shards for data=streaming: prepare.py data=cifar10 data.root=PATH out=DIR."""
    precheck("prepare", sys.argv[1:])
    _prepare()


REPORT_HELP = """Tabulate a sweep: report.py multirun/<name>/<time> [more folders] [--out DIR] [--no-wandb].

Writes report.md, report.csv and plots (into the folder given, unless --out) with one row per job: the swept
values, final losses and bits/dim, quality scores by protocol, steps, wall time and how the job ended."""


def report_main(argv: list[str] | None = None) -> None:
    """report.py: argparse, not Hydra (folders in, files out)."""
    import argparse

    parser = argparse.ArgumentParser(description=REPORT_HELP.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="a multirun folder (multirun/<name>/<time>) or run folders")
    parser.add_argument("--out", help="where report.md, report.csv and the plots go (default: the folder given)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B even if the jobs did")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from diffusion.run.commands.report import report  # after parsing: --help stays fast

    try:
        with stop_on_signals(lambda: INTACT):  # temporary files removed on the way out
            report(args.dirs, args.out, use_wandb=not args.no_wandb)
    except UserError as err:
        fail(str(err))
    except Interrupted as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
