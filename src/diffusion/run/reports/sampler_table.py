"""evaluate.py's sampler table: quality per network evaluation (NFE) and wall time per image of several samplers.

The default table (`SamplerTableConfig.samplers`) runs ancestral sampling over all T steps and NFE 5, 10, 20,
50, 100 of every sampler the registry puts in the table (ddim, dpmpp_2m, dpmpp_2m_sde, unipc and heun); its entries
with more steps than a DDPM's T allows, or ancestral sampling for an objective without DDPM's chain, are skipped
with a printed note. An entry of a table the user wrote that cannot run is an error before any
sampling. Rows go to report.json, samplers.md and samplers.png (FD against NFE, one line per sampler).
"""

import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffusion.config.entry import SamplerTableConfig
from diffusion.core.objectives.base import Objective
from diffusion.core.sampling import SAMPLERS, SamplerSpec
from diffusion.figures.saving import save_figure
from diffusion.files import write_file
from diffusion.metrics.quality import PRIMARY, brief_keys, cell, column_title, protocol_id, score_cells


def table_samplers(table: DictConfig, objective: Objective) -> list[SamplerSpec]:
    """The entries of cfg.sampler_table that run on this objective (see the module docstring)."""
    given = OmegaConf.to_container(table.samplers, resolve=True)
    is_default = given == [asdict(spec) for spec in SamplerTableConfig().samplers]
    specs, too_long, no_chain = [], [], []
    for i, entry in enumerate(given):
        key = f"sampler_table.samplers[{i}]"
        spec = SamplerSpec(**entry)
        most = spec.most_steps(objective)
        if is_default and spec.steps is not None and most is not None and spec.steps > most:
            too_long.append(f"{spec.name}-{spec.steps}")
        elif is_default and SAMPLERS[spec.name].markov_chain and not objective.markov_chain:
            no_chain.append(spec.name)
        else:
            specs.append(spec.check_for(objective, key))
    if too_long:
        print(f"sampler table: skipping {', '.join(too_long)} (more steps than the model's T={objective.num_levels} "
              "allows)")
    if no_chain:
        print(f"sampler table: skipping {', '.join(no_chain)} (DDPM's Markov chain, which objective={objective.name} "
              "has not)")
    return specs


def table_rows(specs: list[SamplerSpec], run: Callable[[SamplerSpec], tuple[dict, dict]], num_samples: int,
               objective: Objective) -> list[dict[str, Any]]:
    """One row per sampler: its label, steps, NFE, sampling seconds per image and scores; `run(spec)` gives
    the results and protocol of a pass over num_samples images."""
    rows = []
    for spec in specs:
        results, protocol = run(spec)
        rows.append({"sampler": spec.label(objective), "name": spec.named(objective).name,
                     "steps": protocol["sampler"]["steps"], "nfe": spec.nfe(objective), "num_samples": num_samples,
                     "seconds_per_image": results["sampling_device_seconds"] / num_samples, **results["quality"],
                     "protocol_id": protocol_id(protocol)})
    return rows


def tuned_rows(rows: list[dict], seconds: float | None, devices: str | None) -> list[dict]:
    """A consistency-tuned model's rows, marked as such and carrying the seconds its tuning took (None: its
    checkpoint does not record them)."""
    return [{**row, "sampler": f"{row['sampler']} (tuned)", "tuning_seconds": seconds, "tuning_devices": devices}
            for row in rows]


def _tuning(row: dict) -> str:
    """The tuning-cost cell: 0 for a training-free sampler, the tuning's seconds and devices for a tuned model."""
    if "tuning_seconds" not in row:
        return "0"
    if row["tuning_seconds"] is None:
        return "not recorded"
    return f"{row['tuning_seconds']:.0f} ({row['tuning_devices']})"


def _table(rows: list[dict]) -> tuple[list[str], list[str], list[list]]:
    """The columns (sampler, NFE, s / image, the tuning's seconds when a tuned model has rows, then the scores' short
    list as far as measured), their result keys and each row's cells."""
    keys = [k for k in brief_keys() if any(k in row for row in rows)]
    tuned = any("tuning_seconds" in row for row in rows)
    columns = ["sampler", "NFE", "s / image", *(["tuning s"] if tuned else []), *map(column_title, keys)]
    return columns, keys, [[row["sampler"], row["nfe"], round(row["seconds_per_image"], 5),
                            *([_tuning(row)] if tuned else []), *score_cells(row, keys)] for row in rows]


def write_table(rows: list[dict], num_samples: int, extractor: str, out: Path) -> tuple[Path, Path]:
    """samplers.md (quality and time per sampler) and samplers.png (FD against NFE, log scale, a line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    columns, keys, cells = _table(rows)
    tuned = any("tuning_seconds" in row for row in rows)
    lines = [f"Sampler comparison: {num_samples} samples each; NFE = network evaluations per image; scores in the "
             f"`{extractor}` feature space against the train split unless named (FD: Fréchet distance), IS of the "
             "samples alone; s / image = sampling device-seconds per image"
             + ("; tuning s = the training seconds of a consistency-tuned model's tuning on its devices (0: "
                "training-free)." if tuned else "."), "",
             "| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for sampler, nfe, seconds, *rest in cells:
        extra, scores = rest[:len(rest) - len(keys)], rest[len(rest) - len(keys):]
        lines.append(f"| {sampler} | {nfe} | {seconds:.4f} | " + "".join(f"{c} | " for c in extra) +
                     " | ".join(cell(k, v) for k, v in zip(keys, scores, strict=True)) + " |")
    md = out / "samplers.md"
    write_file(md, "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    def line_of(row: dict) -> str:  # the label without the steps: 'dpmpp_2m', 'ddim η=0', 'unipc order=3 karras'
        return re.sub(r"-\d+", "", row["sampler"], count=1)

    for name in dict.fromkeys(line_of(row) for row in rows):
        points = sorted((row["nfe"], row[PRIMARY]) for row in rows if line_of(row) == name)
        line = ax.plot(*zip(*points, strict=True), "o-", label=name)[0]
        if len(points) == 1:  # a single budget (ancestral over all T): a reference level across the plot
            ax.axhline(points[0][1], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{name}-{points[0][0]} level")
    # FD spans orders of magnitude between 5 and 100 NFE: both axes logarithmic
    ax.set(xscale="log", yscale="log", xlabel="NFE (network evaluations per image)",
           ylabel=f"FD ({extractor} features, train)", title=f"Quality per NFE ({num_samples} samples each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = save_figure(fig, out / "samplers.png", dpi=120)
    print(f"sampler table: {md} and {png}")
    return md, png


def log_table(logger, rows: list[dict], png: Path) -> None:
    """The table (eval/sampler_table, a W&B table) and the plot (eval/samplers, an image) to a W&B logger."""
    columns, _, cells = _table(rows)
    logger.log_table("eval/sampler_table", columns=columns, data=cells)
    logger.log_image("eval/samplers", [str(png)])
