"""Tabulate a sweep: python report.py multirun/<name>/<time> [more folders] [--out DIR] [--no-wandb].

Writes report.md, report.csv and plots (into the folder given, unless --out) with one row per job: the swept
values, final losses and bits/dim, quality scores by protocol, steps, wall time and how the job ended.
"""

import argparse
import sys

from diffusion.cli import fail
from diffusion.errors import UserError


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="a multirun folder (multirun/<name>/<time>) or run folders")
    parser.add_argument("--out", help="where report.md, report.csv and the plots go (default: the folder given)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B even if the jobs did")
    args = parser.parse_args(argv)
    from diffusion.run.report_command import report  # after parsing: --help stays fast

    try:
        report(args.dirs, args.out, use_wandb=not args.no_wandb)
    except UserError as err:
        fail(str(err))


if __name__ == "__main__":
    main(sys.argv[1:])
