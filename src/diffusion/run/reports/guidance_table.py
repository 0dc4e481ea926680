"""evaluate.py's guidance table: the same sampler at each guidance scale w of a class-conditional checkpoint.

One row per w (`guidance_table=[0,1,2,3]`): FD, precision and recall against the train split and, where the
feature extractor classifies the model's classes (the digits CNN for the digits), `class_accuracy`, the
share of samples classified as the label they were asked for. Written as guidance.md, guidance.json and
guidance.png (FD against precision and recall, each point labelled with its w; class accuracy against w).
"""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffusion.core.sampling import SamplerSpec
from diffusion.errors import UserError
from diffusion.figures.saving import save_figure
from diffusion.files import write_file
from diffusion.metrics.quality import PRIMARY, brief_keys, cell, column_title, protocol_id, score_cells


def guidance_samplers(scales: list[float], sampler: SamplerSpec, num_classes: int | None,
                      cond_drop_prob: float | None) -> list[SamplerSpec]:
    """The sampler at each scale, checked (a class-conditional model that learned its unconditional pass, scales in
    range) before any sampling."""
    given = [float(w) for w in scales]
    if num_classes is None:
        raise UserError(f"guidance_table={given} compares guidance scales, which need a "
                        "class-conditional model, but the checkpoint is unconditional (trained without "
                        "model.num_classes); leave out guidance_table, or evaluate a class-conditional checkpoint")
    if cond_drop_prob == 0 and any(w != 1 for w in given):
        raise UserError(f"guidance_table={given} mixes in the unconditional pass, which this model never learned "
                        "(trained with training.cond_drop_prob=0, it never saw the \"no label\" input); leave out "
                        "guidance_table, or train with training.cond_drop_prob=0.1")
    return [replace(sampler, guidance_scale=w).check(f"guidance_table[{i}]") for i, w in enumerate(given)]


def guidance_rows(specs: list[SamplerSpec], run: Callable[[SamplerSpec], tuple[dict, dict]],
                  num_samples: int) -> list[dict[str, Any]]:
    """One row per scale: w and the pass's scores (`run(spec)` gives a pass's results and protocol)."""
    rows = []
    for spec in specs:
        results, protocol = run(spec)
        rows.append({"guidance_scale": spec.guidance_scale, "num_samples": num_samples, **results["quality"],
                     "protocol_id": protocol_id(protocol)})
    return rows


ACCURATE = 0.95  # the share of samples classified as asked above which a w counts as following its labels


def best_row(rows: list[dict]) -> dict:
    """The row of the best w: the lowest FD among the rows whose class accuracy is at least 95% (where the
    extractor classifies; every row otherwise); if none reaches 95%, the highest class accuracy."""
    accurate = [r for r in rows if r.get("class_accuracy", 1.0) >= ACCURATE]
    if not accurate:
        return max(rows, key=lambda r: (r["class_accuracy"], -r[PRIMARY]))
    return min(accurate, key=lambda r: r[PRIMARY])


def _table(rows: list[dict]) -> tuple[list[str], list[str], list[list]]:
    """The columns (w, then the scores' short list as far as measured), their result keys and each row's cells."""
    keys = [k for k in brief_keys() if any(k in row for row in rows)]
    return ["w", *map(column_title, keys)], keys, [[row["guidance_scale"], *score_cells(row, keys)] for row in rows]


def write_guidance_table(rows: list[dict], sampler_label: str, extractor: str, out: Path) -> tuple[Path, Path]:
    """guidance.md and guidance.json (the rows) and guidance.png (the trade-off plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    n = rows[0]["num_samples"]
    columns, keys, cells = _table(rows)
    lines = [f"Classifier-free guidance: {n} samples per scale w ({sampler_label}), labels balanced over the "
             f"classes; scores in the `{extractor}` feature space against the train split unless named; class "
             "accuracy: the share classified as the label asked for (only where the extractor classifies the "
             "model's classes). w = 0 is unconditional, w = 1 conditional.", "",
             "| " + " | ".join(columns) + " |", "|---:|" + "---:|" * (len(columns) - 1)]
    for w, *scores in cells:
        lines.append(f"| {w:g} | " + " | ".join(cell(k, v) for k, v in zip(keys, scores, strict=True)) + " |")
    md = out / "guidance.md"
    write_file(md, "\n".join(lines) + "\n")
    write_file(out / "guidance.json", json.dumps(rows, indent=2))
    accuracy = any("class_accuracy" in row for row in rows)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(9.5 if accuracy else 5, 3.8), squeeze=False)
    ax = axes[0, 0]
    for key, marker in (("precision_train", "o-"), ("recall_train", "s--")):
        ax.plot([r[PRIMARY] for r in rows], [r[key] for r in rows], marker, label=key.removesuffix("_train"))
    for r in rows:
        ax.annotate(f"w={r['guidance_scale']:g}", (r[PRIMARY], r["precision_train"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set(xlabel=f"FD ({extractor} features, train)", ylabel="precision / recall", title="Guidance trade-off")
    ax.legend(fontsize=8)
    if accuracy:
        ax = axes[0, 1]
        ax.plot([r["guidance_scale"] for r in rows], [r.get("class_accuracy") for r in rows], "o-")
        ax.set(xlabel="guidance scale w", ylabel="class accuracy", title="Samples classified as asked")
    fig.tight_layout()
    png = save_figure(fig, out / "guidance.png", dpi=120)
    print(f"guidance table: {md} and {png}")
    return md, png


def log_guidance_table(logger, rows: list[dict], png: Path) -> None:
    """The table (eval/guidance_table) and the plot (eval/guidance) to a W&B logger."""
    columns, _, cells = _table(rows)
    logger.log_table("eval/guidance_table", columns=columns, data=cells)
    logger.log_image("eval/guidance", [str(png)])
