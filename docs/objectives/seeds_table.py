"""The README's objectives table from a sweep folder: for each objective, every sampler's FD as mean ± std over seeds.

    python docs/objectives/seeds_table.py multirun/objectives/<time>

Reads each job's .hydra/overrides.yaml (its objective) and status.json (the FDs the run logged at its end: `val/fid`
for the main sampler, `val/fid@<tag>` for each extra one) and prints a Markdown table with one row per sampler and
one column per objective. The standard deviation is the sample one (n - 1) over the seeds; a cell whose seeds did not
all finish says how many did.
"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

MAIN_TAG = "heun-35"  # conf/experiment/objectives.yaml's callbacks.quality.sampler
SHARED = ("heun-9", "dpmpp_2m-10", MAIN_TAG, "dpmpp_2m-35")  # the samplers every objective is scored with


def read(sweep: Path) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """{row: {objective: FDs over seeds}} with row a shared sampler's tag or "own", and each objective's own tag."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    own_tags: dict[str, str] = {}
    for job in sorted(p.parent for p in sweep.glob("*/status.json")):
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        status = json.loads((job / "status.json").read_text())
        if status["status"] != "finished":
            continue
        objective = overrides.get("objective", "ddpm")
        for metric, value in status["metrics"].items():
            if not (metric == "val/fid" or metric.startswith("val/fid@")):
                continue
            tag = metric.partition("@")[2] or MAIN_TAG
            if tag not in SHARED:  # the objective's own sampler (ddpm-1000, heun-20, euler-50): one row for all
                own_tags[objective], tag = tag, "own"
            scores[tag][objective].append(value)
    return scores, own_tags


def cell(values: list[float], seeds: int) -> str:
    if not values:
        return ""
    text = f"{statistics.mean(values):.3f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.3f}"
    return text + ("" if len(values) == seeds else f" ({len(values)} of {seeds} seeds)")


def main(sweep: Path) -> None:
    scores, own_tags = read(sweep)
    objectives = sorted({o for by in scores.values() for o in by})
    seeds = max(len(v) for by in scores.values() for v in by.values())
    print("| sampler-NFE | " + " | ".join(f"`{o}`" for o in objectives) + " |")
    print("|---|" + "---:|" * len(objectives))
    for tag in [t for t in (*SHARED, "own") if t in scores]:
        name = tag if tag != "own" else "own sampler: " + ", ".join(own_tags.get(o, "") for o in objectives)
        print(f"| {name} | " + " | ".join(cell(scores[tag].get(o, []), seeds) for o in objectives) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
