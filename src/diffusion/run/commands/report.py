"""report(dirs, out): a sweep's table (report.md, report.csv), its plots, and the same table in W&B.

Plots: each metric of report.md against each swept parameter (report_vs_<key>.png: one panel a metric,
one line per combination of the other swept values, finished jobs only), and the per-epoch training loss
of every t-bin with all jobs overlaid (report_loss_by_t.png, from each job's loss_by_t.csv).
"""

import math
import os
import re
from pathlib import Path

from diffusion.errors import UserError
from diffusion.figures.saving import save_figure
from diffusion.files import write_file
from diffusion.run.jobs.preflight import writable_dir
from diffusion.run.reports.sweep import (
    build_rows,
    columns,
    find_jobs,
    label,
    markdown,
    read_job,
    wandb_target,
    write_csv,
)


def report(dirs: list[str | Path], out: str | Path | None = None, use_wandb: bool = True) -> Path:
    """Write report.md, report.csv and the plots into `out` (default: the folder given, or the folders' common
    parent); with W&B on in the jobs' configs, log the table as a W&B Table in the sweep's group."""
    if not dirs:
        raise UserError("report.py needs a folder; give a multirun folder: python report.py multirun/<name>/<time>")
    dirs = [Path(d) for d in dirs]
    jobs = [read_job(path, name) for path, name in find_jobs(dirs)]
    out = Path(out) if out else dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
    writable_dir(out, "--out")  # before the plots: a folder that cannot be written is one line
    rows, swept, measurements = build_rows(jobs)
    labels = {row["job"]: label(row, swept) for row in rows}
    figures = [*plot_vs_swept(rows, swept, columns(rows, swept, brief=True), out), *plot_loss_by_t(jobs, labels, out)]
    write_csv(rows, columns(rows, swept, brief=False), out / "report.csv")
    title = ", ".join(str(d) for d in dirs)
    write_file(out / "report.md", markdown(rows, swept, measurements, title, figures))
    target = wandb_target(jobs) if use_wandb else None
    if target is not None:
        log_to_wandb(rows, columns(rows, swept, brief=False), figures, target, out)
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in dict.fromkeys(r["status"] for r in rows))
    print(f"report: {out / 'report.md'} and {out / 'report.csv'} ({len(rows)} jobs: {counts})")
    return out


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_swept(rows: list[dict], swept: list[str], cols: list[str], out: Path) -> list[Path]:
    """report_vs_<key>.png for each swept key: every metric of the table against it (finished jobs)."""
    done = [r for r in rows if r["status"] == "finished"]
    metrics = [c for c in cols if "/" in c and any(_number(r.get(c)) is not None for r in done)]
    paths = []
    for key in swept:
        if not metrics or not done:
            break
        plt = _pyplot()
        numeric = all(_number(r[key]) is not None for r in done)
        order = sorted({r[key] for r in done}, key=lambda v: _number(v) if numeric else v)
        position = {v: (_number(v) if numeric else i) for i, v in enumerate(order)}
        others = [k for k in swept if k != key]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            for combo in dict.fromkeys(tuple(r[k] for k in others) for r in done):
                pts = sorted((position[r[key]], _number(r.get(metric))) for r in done
                             if tuple(r[k] for k in others) == combo and _number(r.get(metric)) is not None)
                label = ", ".join(f"{k}={v}" for k, v in zip(others, combo, strict=True)) or None
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            if numeric and all(position[v] > 0 for v in order) and max(position.values()) / min(
                    position.values()) >= 10:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(order)), order, rotation=30, fontsize=7)
            ax.set(xlabel=key, title=metric)
            ax.title.set_fontsize(8)
        if others:
            axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        paths.append(out / f"report_vs_{_safe(key)}.png")
        save_figure(fig, paths[-1], dpi=110)
    return paths


def _bin_parts(name: str) -> tuple[str, str, str]:
    """A loss-by-level bin's name, "t0000-0099" (DDPM's steps), "t0.10-0.20" (flow's t) or "sigma0.147-0.301" (σ),
    split into its variable and its two ends."""
    variable = name.rstrip("0123456789.-e+")
    lo, _, hi = name[len(variable):].partition("-")
    return variable, lo, hi


def _bin_order(name: str) -> tuple:
    """DDPM's step bins, then flow's t bins, then σ bins, each from the lowest level up."""
    variable, lo, _ = _bin_parts(name)
    try:
        return variable, not lo.isdigit(), float(lo), name
    except ValueError:  # not a bin of ours: after them, by name
        return variable, True, math.inf, name


def bin_title(name: str) -> str:
    """ "t in [0, 99]", "t in [0.10, 0.20]", "σ in [0.147, 0.301]"; any other column keeps its name."""
    variable, lo, hi = _bin_parts(name)
    try:
        float(lo), float(hi)
    except ValueError:
        return name
    lo, hi = (str(int(v)) if v.isdigit() else v for v in (lo, hi))  # DDPM's zero-padded steps
    return f"{'σ' if variable == 'sigma' else variable} in [{lo}, {hi}]"


def plot_loss_by_t(jobs: list[dict], labels: dict[str, str], out: Path) -> list[Path]:
    """report_loss_by_t.png: one panel a t-bin, the training loss against the step, every job overlaid."""
    curves = [(labels[job["name"]], job["loss_by_t"]) for job in jobs if job["loss_by_t"]]
    if not curves:
        return []
    plt = _pyplot()
    bins = sorted({k for _, rows in curves for r in rows for k in r if k != "step"}, key=_bin_order)
    ncols = min(5, len(bins))
    nrows = math.ceil(len(bins) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, bins, strict=False):
        for job_label, rows in curves:
            pts = [(r["step"], r[name]) for r in rows if name in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, label=job_label)
        ax.set(title=bin_title(name), xlabel="step")
        ax.title.set_fontsize(8)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss, epoch mean")
    for ax in list(axes.flat)[len(bins):]:
        ax.axis("off")
    # jobs of different objectives draw into different bins: the legend gathers every panel's, each job once
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    names, handles = list(legend), list(legend.values())
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(names) / 4), 1, 1))
    path = out / "report_loss_by_t.png"
    return [save_figure(fig, path, dpi=110)]


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)


def log_to_wandb(rows: list[dict], cols: list[str], figures: list[Path], target: dict, out: Path) -> None:
    """A W&B run named `report` (job_type report) in the sweep's group: the table as a W&B Table, the plots."""
    import wandb

    cells = [[row.get(c) if not isinstance(row.get(c), (dict, list)) else str(row.get(c)) for c in cols]
             for row in rows]
    run = wandb.init(project=target["project"], group=target["group"], name="report", job_type="report",
                     dir=str(out), mode="offline" if target["offline"] else "online",
                     settings=wandb.Settings(silent=True))
    try:
        run.log({"sweep/report": wandb.Table(columns=cols, data=[[_plain(v) for v in r] for r in cells]),
                 **{f"sweep/{p.stem}": wandb.Image(str(p)) for p in figures}})
    finally:
        run.finish()
    print(f"W&B: the table as `sweep/report` in group {target['group']} ({Path(run.dir).parent})")


def _plain(value):
    """Cells W&B's Table accepts in one column: numbers and None as they are, the rest as strings."""
    return value if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) else str(value)
