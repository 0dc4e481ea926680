"""report(dirs): one row per job of a sweep (or of a list of run folders), from the runs' own files, offline.

A job is a folder with .hydra/config.yaml (its resolved config) and .hydra/overrides.yaml (its command-line
values); its status.json (diffusion.run.jobs.status) says how it ended and what it measured, and its
loss_by_t.csv holds the per-epoch training loss binned over t. The swept parameters are the override keys
whose values differ between the jobs. Quality scores go in one column only when they were measured alike:
the column is named by the protocol's measurement id (`measurement_id`: the protocol less what it records of
the model, its weights, objective and T, which are the jobs' own columns), so scores measured differently never
share a column.
"""

import csv
import math
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion.errors import UserError
from diffusion.files import written_whole
from diffusion.lightning.callbacks.loss_by_t import read_loss_by_t
from diffusion.metrics.quality import describe_measurement, is_headline, measurement_id
from diffusion.run.jobs.status import read_status
from diffusion.run.jobs.sweep import sweep_group

LOSSES = ["train/loss", "val/loss", "val/bpd", "eval/bpd"]  # what a row shows besides quality, when logged


def find_jobs(dirs: list[Path]) -> list[tuple[Path, str]]:
    """(folder, name) of each job: a folder given that is a run itself, else the runs below it by job number,
    named by their path below it. Runs may lie deeper than one level: an override whose value is a path puts
    '/' in Hydra's job folder name."""
    jobs = []
    for folder in dirs:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder; give a multirun folder (multirun/<name>/<time>) or run "
                            "folders (outputs/<name>/<time>)")
        found = []
        for here, subdirs, _ in os.walk(folder):
            if (Path(here) / ".hydra" / "config.yaml").is_file():
                found.append(Path(here))
                subdirs.clear()  # a run's own folders (checkpoints, wandb) hold no further runs
            else:
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if not found:
            raise UserError(f"{folder} is not a sweep: no job folders with .hydra/config.yaml in it; give a multirun "
                            "folder (multirun/<name>/<time>) or run folders (outputs/<name>/<time>)")
        found.sort(key=lambda p: _job_order(p, folder))
        jobs += [(p, p.name if p == folder else str(p.relative_to(folder))) for p in found]
    return jobs


def _job_order(path: Path, folder: Path) -> tuple:
    number = str(path.relative_to(folder)).split("_", 1)[0]
    return (0, int(number), str(path)) if number.isdigit() else (1, 0, str(path))


def read_job(path: Path, name: str) -> dict[str, Any]:
    """What report.py needs of one job folder (its config, overrides, status, loss-by-t rows).

    A folder that cannot be read whole (a cut-off .hydra/config.yaml, a file that cannot be read) is a job all
    the same: `damaged` says which file and why, and its row is marked unknown (build_rows)."""
    hydra_dir = path / ".hydra"
    job = {"path": path, "name": name, "config": OmegaConf.create(), "overrides": {}, "hydra": None,
           "status": read_status(path), "loss_by_t": [], "damaged": None}
    file = hydra_dir / "config.yaml"
    try:
        config = OmegaConf.load(file)
        if not isinstance(config, DictConfig):
            raise ValueError(f"a {type(config).__name__}, not a mapping")
        job["config"] = config
        if (file := hydra_dir / "overrides.yaml").is_file():
            job["overrides"] = dict(_split(o) for o in OmegaConf.load(file))
        if (file := hydra_dir / "hydra.yaml").is_file():
            job["hydra"] = OmegaConf.load(file).hydra
        file = path / "loss_by_t.csv"
        job["loss_by_t"] = read_loss_by_t(file)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        reason = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
        job.update(config=OmegaConf.create(), overrides={}, hydra=None, loss_by_t=[],
                   damaged=f"{file.relative_to(path)} cannot be read ({reason})")
    return job


def _split(override: str) -> tuple[str, str]:
    key, _, value = str(override).partition("=")
    return key.lstrip("+~"), value


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (all of a lone job's), in the order first seen."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    if len(jobs) == 1:
        return keys
    return [k for k in keys if len({job["overrides"].get(k) for job in jobs}) > 1]


def build_rows(jobs: list[dict]) -> tuple[list[dict], list[str], dict[str, str]]:
    """(rows, swept keys, {quality column: its measurement's description}); one row per job."""
    swept, measurements, rows = swept_keys(jobs), {}, []
    for job in jobs:
        status = job["status"] or {}
        row = {"job": job["name"], **{k: job["overrides"].get(k, "") for k in swept}}
        row["status"] = "unknown" if job.get("damaged") else status.get("status", "unknown")
        row["step"], row["wall_seconds"] = status.get("step"), status.get("wall_seconds")
        metrics, quality = status.get("metrics") or {}, status.get("quality") or {}
        row.update({k: v for k, v in metrics.items() if k not in quality})
        extra = {f"@{tag}": (m.get("quality") or {}, m.get("quality_protocol"))
                 for tag, m in (status.get("quality_extra") or {}).items()}
        for suffix, (scores, protocol) in {"": (quality, status.get("quality_protocol")), **extra}.items():
            if protocol and scores:
                mid = measurement_id(protocol)
                measurements[mid] = describe_measurement(protocol)
                row.update({f"{k}{suffix} [{mid}]": v for k, v in scores.items()})
        row["weights"], row["protocol_id"] = status.get("weights"), status.get("quality_protocol_id")
        row["note"] = _note(status, job)
        rows.append(row)
    return rows, swept, measurements


def _note(status: dict, job: dict) -> str:
    """The one-line error of a failed job, the resume command of an interrupted one, why a status is unknown."""
    if job.get("damaged"):
        return f"damaged job folder: {job['damaged'][:200]}"
    if not status:
        return "no status.json: killed, still running, or run before jobs wrote one"
    if status.get("status") == "running":
        return "no end recorded: still running, or killed"
    if status.get("status") == "interrupted":
        return f"{status.get('error')}; resume with: {status.get('resume')}"
    return status.get("error") or ""


def columns(rows: list[dict], swept: list[str], brief: bool) -> list[str]:
    """Column order: job, swept values, status, step, time, losses, quality scores, weights, protocol, note."""
    present = list(dict.fromkeys(k for row in rows for k in row))
    losses = [k for k in LOSSES if k in present]
    quality = [k for k in present if " [" in k and (not brief or _is_main(k))]
    weights = ["weights"] if len({row["weights"] for row in rows} - {None}) > 1 or not brief else []
    tail = [*weights, *(["protocol_id"] if not brief else []), "note"]
    return ["job", *swept, "status", "step", "wall_seconds", *losses, *quality, *tail]


def _is_main(column: str) -> bool:
    """A headline score's column ('val/fid [ab12cd34]', 'val/fid@heun-9 [cd34ef56]' of an extra sampler): report.md
    shows these, report.csv every score."""
    return is_headline(column.split(" [")[0].split("@")[0])


def write_csv(rows: list[dict], cols: list[str], path: Path) -> None:
    with written_whole(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row.get(k)) for k in cols} for row in rows)


def markdown(rows: list[dict], swept: list[str], measurements: dict[str, str], title: str,
             figures: list[Path]) -> str:
    """report.md: the table, what each measurement id stands for, the figures."""
    cols = columns(rows, swept, brief=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    lines = [f"# Sweep report: {title}", "",
             f"{len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}); swept: "
             f"{', '.join(f'`{k}`' for k in swept) or 'nothing'}. All columns are in report.csv.", "",
             "| " + " | ".join(_header(c) for c in cols) + " |",
             "|" + "|".join("---:" if c in ("step", "wall_seconds") or "/" in c else "---" for c in cols) + "|"]
    lines += ["| " + " | ".join(_cell(_short(row[c]) if c == "job" else row.get(c)) for c in cols) + " |"
              for row in rows]
    if measurements:
        lines += ["", "Quality scores, by measurement id (the protocol less what it says of the model: its weights, "
                  "objective and T; `protocol_id` in report.csv is the full one):", ""]
        lines += [f"- `{mid}`: {text}" for mid, text in measurements.items()]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in figures)]
    return "\n".join(lines) + "\n"


def label(row: dict, swept: list[str]) -> str:
    """A job as its swept values (lr=0.001, schedule=cosine), else its folder's name."""
    return ", ".join(f"{k.split('.')[-1]}={row[k]}" for k in swept) or row["job"]


def _short(job: str) -> str:
    """A multirun job's number (its folder is <num>_<overrides>: the swept values have their own columns)."""
    number = job.split("_", 1)[0]
    return number if number.isdigit() and "/" not in number else job


def _header(column: str) -> str:
    return {"wall_seconds": "wall s"}.get(column, column)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _sweep_dir(job: dict) -> str:
    """The sweep folder the job ran in: its saved hydra.sweep.dir when that is a plain path, else the job folder's
    parent (a saved ${now:...} or ${run_id:} resolves to another time when read later, or not at all outside
    Hydra; the sweep's subdir is one folder)."""
    raw = OmegaConf.to_container(job["hydra"].sweep, resolve=False).get("dir")
    return str(raw) if raw is not None and "${" not in str(raw) else str(Path(job["path"]).parent)


def wandb_target(jobs: list[dict]) -> dict | None:
    """project, group and offline mode of the jobs' W&B runs (None when they logged without W&B)."""
    loggers = [job["config"].get("logger") for job in jobs]
    if not loggers or any(lg is None for lg in loggers):
        return None
    groups = set()
    for job, logger in zip(jobs, loggers, strict=True):
        sweep_dir = _sweep_dir(job) if job["hydra"] is not None and job["hydra"].mode == "MULTIRUN" else None
        groups.add(sweep_group(job["config"].name, logger.group, sweep_dir) if sweep_dir else logger.group)
    return {"project": loggers[0].project, "group": groups.pop() if len(groups) == 1 else None,
            "offline": bool(loggers[0].offline)}
