"""The model card (README.md) of an exported diffusers folder: what was trained, how, and how well.

Everything comes from the checkpoint and its run directory (`<run>/checkpoints/<name>.ckpt`): the command
line and config Hydra saved (`.hydra/`), the quality scores the training run logged to W&B at the
checkpoint's own step (read back with wandb's reader, `wandb leet inspect`), and evaluate.py's reports of
this very checkpoint (`report.json` anywhere under the run). Each score keeps the protocol id it was made
under; with none found the card says "not measured".
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion.core.objectives.base import objective_class
from diffusion.core.sampling import sampler_label
from diffusion.formats.diffusers_schedulers import PIPELINES, scheduler_of
from diffusion.lightning.callbacks.sample_quality import shown_names
from diffusion.metrics.quality import brief_keys


def run_directory(ckpt: Path) -> Path:
    """The training run a checkpoint belongs to: <run>/checkpoints/x.ckpt -> <run>."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _protocol_text(pid: str, protocol: dict) -> str:
    """'protocol ab12cd34: 1000 samples ddim-50 η=0 ema vs train 1500/val 297, digits-cnn-v1' (the logged id)."""
    refs = "/".join(f"{split} {r['num_images']}" for split, r in protocol["reference"].items())
    return (f"protocol {pid}: {protocol['num_generated']} samples {sampler_label(protocol['sampler'])} "
            f"{protocol['weights']} vs {refs}, {protocol['extractor']}")


def _scores_text(scores: dict, keys: list[str]) -> str:
    return " · ".join(f"{k} {scores[k]:.4g}" for k in keys if k in scores)


def _wandb_records(run_file: Path) -> list[dict]:
    """The records of a W&B run file, read with wandb's own reader."""
    exe = Path(sys.executable).parent / "wandb"
    exe = str(exe) if exe.is_file() else shutil.which("wandb") or "wandb"
    out = subprocess.run([exe, "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                         timeout=300, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_evaluations(run_file: Path) -> list[dict]:
    """Each quality evaluation a training run logged: its step, scores, and protocol (id, settings).

    The quality callback logs the scores, then the protocol only when it changed: an evaluation followed by
    no protocol record has the previous one's.
    """
    evaluations = []
    for record in _wandb_records(run_file):
        if record.get("type") == "history":
            item = record["history"]["item"]
            if any(k in item for k in shown_names()):
                scores = {k: item[k] for k in shown_names() if k in item}
                evaluations.append({"step": item.get("trainer/global_step"), "scores": scores, "protocol": None})
        elif record.get("type") == "config" and evaluations and evaluations[-1]["protocol"] is None:
            update = record["config"].get("update", {})
            if "quality_protocol_id" in update:
                evaluations[-1]["protocol"] = (update["quality_protocol_id"], update["quality_protocol"])
    for before, evaluation in zip([None, *evaluations], evaluations, strict=False):
        if evaluation["protocol"] is None and before is not None:
            evaluation["protocol"] = before["protocol"]
    return evaluations


def quality_lines(ckpt: Path, step: int | None) -> list[str]:
    """Markdown bullets: the scores of this checkpoint found in its run, or why there are none."""
    run = run_directory(ckpt)
    lines, other_steps = [], set()
    for run_file in sorted(run.glob("wandb/*run-*/run-*.wandb")):
        try:
            evaluations = wandb_evaluations(run_file)
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError, KeyError) as err:
            lines.append(f"- W&B run `{run_file.parent.name}` could not be read ({type(err).__name__}); "
                         "its scores are left out")
            continue
        for e in evaluations:
            if e["step"] != step or e["protocol"] is None:
                other_steps.add(e["step"])
                continue
            lines.append(f"- training run, W&B `{run_file.parent.name}`, step {step:,}: "
                         f"{_scores_text(e['scores'], shown_names())} [{_protocol_text(*e['protocol'])}]")
    for path in sorted(run.rglob("report.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(report, dict) or Path(report.get("checkpoint", "")) != ckpt.resolve():
            continue
        nll = report.get("nll")
        bpd = f"; NLL {nll['bpd']:.4g} bits/dim on {report['nll_protocol']['split']}" if nll else ""
        lines.append(f"- evaluate.py, `{path.relative_to(run)}`: {_scores_text(report['quality'], brief_keys())} "
                     f"[{_protocol_text(report['protocol_id'], report['protocol'])}]{bpd}")
    if not lines:
        measured = f" (the run measured quality at steps {sorted(s for s in other_steps if s is not None)})" \
            if other_steps else ""
        lines.append(f"- not measured: no quality scores of this checkpoint in {run}{measured}; "
                     f"`python evaluate.py ckpt={ckpt} data=<its data> hydra.run.dir={run}/evaluate` measures "
                     "them, and a new export lists them")
    return lines


def _config_section(run: Path, hparams: dict) -> list[str]:
    """The command line and composed config Hydra saved for the run, else the checkpoint's hyperparameters."""
    hydra = run / ".hydra"
    lines = []
    if (hydra / "overrides.yaml").is_file():
        overrides = OmegaConf.to_container(OmegaConf.load(hydra / "overrides.yaml")) or []
        lines += ["Trained with:", "", "```bash", " ".join(["python train.py", *overrides]), "```", ""]
    if (hydra / "config.yaml").is_file():
        config, name = (hydra / "config.yaml").read_text(), "the run's config (.hydra/config.yaml)"
    else:
        shown = {k: v for k, v in hparams.items() if k != "betas"}
        config, name = json.dumps(shown, indent=2, default=str) + "\n", "the checkpoint's hyperparameters"
    language = "yaml" if name.endswith("config.yaml)") else "json"
    return [*lines, f"<details><summary>{name}</summary>", "", f"```{language}", config.rstrip("\n"), "```", "",
            "</details>"]


def checkpoint_step(ckpt: Path) -> int | None:
    """The optimizer step a training checkpoint was saved at (None for a diffusers folder)."""
    if ckpt.is_dir():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _objective_rows(objective: dict, trained: bool) -> tuple[str, str, list[str]]:
    """(title, one sentence, Markdown table rows) of what the objective is and how diffusers holds it."""
    name = objective_class(objective).name
    if name == "edm":
        return ("EDM model", "A diffusion model with the preconditioning of Karras et al. 2022 (EDM)", [
            f"| objective | EDM: σ_data {objective['sigma_data']:g}, c_noise = ln(σ)/4 as the UNet's timestep, "
            f"`EDMEulerScheduler` (`prediction_type: epsilon` is D = c_skip x + c_out F) |",
            f"| sampling | σ from {objective['sigma_max']:g} down to {objective['sigma_min']:g} on Karras et al.'s "
            "ρ = 7 levels |"])
    if name == "flow":
        return ("flow-matching model", "A flow-matching model on the straight path x_t = (1−t) x0 + t ε with the "
                "velocity target (Lipman et al. 2023; rectified flow)", [
                    f"| objective | flow matching: the UNet predicts v = ε − x0 from x_t and 1000 t, "
                    f"`FlowMatchEulerDiscreteScheduler` (shift {objective['shift']:g}) |"])
    betas = objective["betas"]
    prediction = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[objective["parameterization"]]
    loss = f", trained with the {objective['loss']} loss" if trained else ""  # a diffusers folder does not say
    return ("DDPM", "A denoising diffusion probabilistic model (Ho, Jain & Abbeel 2020)", [
        f"| schedule | T={len(betas)}, betas {betas[0]:.6g} … {betas[-1]:.6g}, stored exactly as `trained_betas`"
        f"{loss} |",
        f"| prediction | {objective['parameterization']} (`prediction_type: {prediction}`) |",
        f"| variance | {objective['variance']} (`variance_type: {objective['variance']}`) |"])


def _usage(out: str, pipeline: str, objective: dict) -> list[str]:
    """How diffusers samples the folder (the pipeline model_index.json names)."""
    steps = len(objective["betas"]) if "betas" in objective else 18 if pipeline != "DDPMPipeline" else 50
    what = {"ddpm": "ancestral sampling over all T steps", "edm": "Euler on Karras et al.'s levels",
            "flow": "Euler from t = 1"}[objective_class(objective).name]
    return ["```python", f"from diffusers import {pipeline}", "",
            f'pipe = {pipeline}.from_pretrained("{out}")',
            f"images = pipe(batch_size=16, num_inference_steps={steps}).images  # {what}", "```"]


def model_card(ckpt: str, out: str, weights: str, hparams: dict, num_parameters: int) -> str:
    """The README.md of the exported folder (Hugging Face model-card front matter, then Markdown)."""
    path = Path(ckpt)
    step, net, objective = checkpoint_step(path), hparams["net"], hparams["objective"]
    shape = f"{net['in_channels']}×{net['image_size']}×{net['image_size']}"
    source = f"diffusers folder `{ckpt}`" if step is None else f"`{ckpt}`, step {step:,}, {weights} weights"
    attention = ", ".join(str(r) for r in net["attn_resolutions"]) or "none"
    title, sentence, rows = _objective_rows(objective, trained=step is not None)
    pipeline = PIPELINES[scheduler_of(objective)["_class_name"]]
    lines = [
        "---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
        f"tags: [{objective_class(objective).name}, diffusion, unconditional-image-generation]", "---", "",
        f"# {title} for {shape} images", "",
        f"{sentence}, exported by `python export.py ckpt={ckpt} out={out} weights={weights}`.", "",
        *_usage(out, pipeline, objective), "",
        "## Model", "", "| | |", "|---|---|",
        f"| source | {source} |",
        f"| network | the paper's U-Net (UNet2DModel): ch={net['ch']}, ch_mult={list(net['ch_mult'])}, "
        f"num_res_blocks={net['num_res_blocks']}, attention at {attention}, dropout {net['dropout']}, "
        f"{net['num_groups']} GroupNorm groups; {num_parameters:,} parameters |",
        *rows, "",
        "## Quality", "", "Scores with different protocol ids are not comparable.", "",
        *quality_lines(path, step), "",
    ]
    if step is not None:
        lines += ["## Training configuration", "", *_config_section(run_directory(path), hparams), ""]
    return "\n".join(lines)
