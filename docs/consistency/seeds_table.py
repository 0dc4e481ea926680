"""The README's quality-per-NFE table of a consistency-tuned model beside its diffusion model, over seeds.

    python docs/consistency/seeds_table.py --reference ddpm <evaluate dir> [<evaluate dir> ...]

Each folder is an `evaluate.py ... sampler_table.enabled=true sampler_table.tuned_ckpt=...` output (one per seed:
its own tuning run, sampled with its own seed). Reads their report.json sampler tables and prints one Markdown row
per sampler: NFE, the tuning's seconds (mean), FD against the train split as mean ± sample std (n − 1) over the
folders, and the mean's distance from the reference row's mean (the same model's ancestral sampling over T, or
any sampler label given with --reference).
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def rows_by_sampler(folders: list[Path]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = defaultdict(list)
    for folder in folders:
        for row in json.loads((folder / "report.json").read_text())["sampler_table"]:
            found[row["sampler"]].append(row)
    return found


def spread(values: list[float]) -> str:
    text = f"{statistics.mean(values):.3f}"
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="ddpm", help="the row the others are compared with")
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    found = rows_by_sampler(args.folders)
    if args.reference not in found:
        raise SystemExit(f"error: no row {args.reference!r} in these tables; rows: {sorted(found)}")
    reference = statistics.mean(r["fid_train"] for r in found[args.reference])
    print(f"| sampler | NFE | tuning s | FD (train), mean ± std over {len(args.folders)} | vs {args.reference} |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in sorted(found.items(), key=lambda item: (item[1][0]["nfe"], item[0])):
        fds = [r["fid_train"] for r in rows]
        seconds = [r["tuning_seconds"] for r in rows if r.get("tuning_seconds") is not None]
        tuning = f"{statistics.mean(seconds):.0f}" if seconds else \
            ("not recorded" if any("tuning_seconds" in r for r in rows) else "0")
        change = statistics.mean(fds) / reference - 1
        count = "" if len(rows) == len(args.folders) else f" ({len(rows)} of {len(args.folders)})"
        print(f"| {name} | {rows[0]['nfe']} | {tuning} | {spread(fds)}{count} | {change:+.0%} |")


if __name__ == "__main__":
    main()
