"""Tabulate a sweep: python report.py multirun/<name>/<time> [more folders] [--out DIR] [--no-wandb].

Writes report.md, report.csv and plots (into the folder given, unless --out) with one row per job: the swept
values, final losses and bits/dim, quality scores by protocol, steps, wall time and how the job ended.
"""

from diffusion.run.entry import report_main

if __name__ == "__main__":
    report_main()
