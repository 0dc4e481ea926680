"""evaluate(cfg): sample quality and bits/dim of a checkpoint, a JSON report, W&B summary, a sampler table."""

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpointing import load_module, load_posthoc_module
from diffusion.config.validation import check_posthoc_sigma_rel
from diffusion.errors import UserError
from diffusion.evaluation import Evaluator
from diffusion.metrics.quality import SampleQuality, describe, make_protocol, protocol_id
from diffusion.run import job_status
from diffusion.run.console import quiet_console
from diffusion.run.figures_command import check_data_fits
from diffusion.run.train_command import sweep_info
from diffusion.sampling import SamplerSpec, as_sampler_spec


def _setup(cfg: DictConfig):
    """The checkpoint's module, the data it was trained on (checked by shape), the feature extractor's name, and
    which weights they are (the protocol's `weights`; with ema.sigma_rel, the post-hoc EMA and how it was made)."""
    if cfg.batch_size < 1 or (cfg.num_samples is not None and cfg.num_samples < 4):
        raise UserError(f"num_samples must be >= 4 and batch_size >= 1, got {cfg.num_samples} and {cfg.batch_size}; "
                        "try num_samples=1000 batch_size=250")
    module, weights, posthoc = _load(cfg)
    table = cfg.sampler_table.samplers if cfg.sampler_table.enabled else []
    for key, spec in [("sampler", cfg.sampler), *((f"sampler_table.samplers[{i}]", s) for i, s in enumerate(table))]:
        as_sampler_spec(OmegaConf.to_container(spec), key).check_steps(module.diffusion.num_timesteps, key)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    check_data_fits(datamodule, module, cfg.ckpt)
    extractor = cfg.feature_extractor.name
    if extractor == "auto":
        extractor = datamodule.quality_extractor
    return module, datamodule, extractor, weights, posthoc


def _load(cfg: DictConfig):
    """(module, the protocol's weights label, post-hoc EMA info or None): weights=ema|raw, or ema.sigma_rel."""
    sigma_rel = cfg.ema.sigma_rel
    if sigma_rel is None:
        return load_module(cfg.ckpt, "cpu", cfg.weights), cfg.weights, None
    check_posthoc_sigma_rel(sigma_rel)
    if cfg.weights != "ema":
        raise UserError(f"weights={cfg.weights} and ema.sigma_rel={sigma_rel} both choose the weights; drop one "
                        "(ema.sigma_rel scores the post-hoc EMA, weights=raw the raw weights)")
    module, info = load_posthoc_module(cfg.ckpt, sigma_rel, cfg.ema.snapshot_dir)
    lo, hi = info["range"]
    at = "" if info["step"] == info["checkpoint_step"] else f" (the checkpoint is at step {info['checkpoint_step']})"
    if rank_zero_only.rank == 0:
        print(f"post-hoc EMA: σ_rel={sigma_rel:g} at step {info['step']}{at} from {len(info['snapshots'])} averages "
              f"in {info['snapshot_dir']}, profile fit error {info['fit_error']:.2%}; these snapshots rebuild σ_rel "
              f"in about [{lo:.3f}, {hi:.3f}]")
    return module, f"posthoc-ema σ_rel={sigma_rel:g}", info


def _trainer(cfg: DictConfig) -> L.Trainer:
    """Every device of the machine (devices=auto), one process each; Lightning's progress bar with its ETA."""
    accelerator = "gpu" if torch.cuda.is_available() and cfg.accelerator == "auto" else cfg.accelerator
    devices = cfg.devices if cfg.devices != "auto" else (torch.cuda.device_count() if accelerator == "gpu" else 1)
    return L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                     logger=False, use_distributed_sampler=False, enable_checkpointing=False,
                     enable_progress_bar=cfg.progress_bar, enable_model_summary=False)


def _pass(cfg, module, datamodule, extractor: str, weights: str, sampler: SamplerSpec, num_samples: int,
          bpd: bool) -> tuple[dict, dict]:
    """One test loop: scores (and bits/dim if asked) and the protocol they were made under."""
    spec = {**OmegaConf.to_container(cfg.feature_extractor, resolve=True), "name": extractor}
    metric = SampleQuality(feature_extractor=spec)
    refs = {split: datamodule.reference_images(split, cfg.max_reference_images or sys.maxsize)
            for split in cfg.reference_splits}
    bpd_images = datamodule.reference_images(cfg.bpd.split, cfg.bpd.num_images or sys.maxsize) if bpd else None
    evaluator = Evaluator(module, sampler, num_samples, cfg.batch_size, cfg.seed, metric, refs, bpd_images,
                          cfg.bpd.batch_size)
    trainer = _trainer(cfg)
    began = time.perf_counter()
    trainer.test(evaluator, verbose=False)
    results = {**evaluator.results, "wall_seconds": time.perf_counter() - began, "devices": trainer.world_size}
    protocol = make_protocol(
        num_generated=num_samples, reference_sizes={split: len(r) for split, r in refs.items()},
        extractor=metric.extractor, sampler=sampler, num_timesteps=module.diffusion.num_timesteps,
        variance=module.diffusion.variance, weights=weights, seed=cfg.seed, settings=metric.settings(num_samples))
    return results, protocol


def evaluate(cfg: DictConfig) -> dict:
    """FID/IS/KID/precision/recall of N samples against the training set, NLL in bits/dim on the test split."""
    quiet_console()
    module, datamodule, extractor, weights, posthoc = _setup(cfg)
    num_samples = cfg.num_samples or datamodule.eval_num_samples
    sampler = as_sampler_spec(OmegaConf.to_container(cfg.sampler, resolve=True))
    results, protocol = _pass(cfg, module, datamodule, extractor, weights, sampler, num_samples, bpd=cfg.bpd.enabled)
    report = {"checkpoint": str(Path(cfg.ckpt).resolve()), "data": datamodule.name, "weights": weights,
              "posthoc_ema": posthoc, "protocol": protocol,
              "protocol_id": protocol_id(protocol), "quality": results["quality"], "nll": results.get("nll"),
              "nll_protocol": {"split": cfg.bpd.split, "num_images": cfg.bpd.num_images, "decoder": "discretized",
                               "num_timesteps": module.diffusion.num_timesteps} if cfg.bpd.enabled else None,
              "timing": {"wall_seconds": results["wall_seconds"], "devices": results["devices"],
                         "sampling_device_seconds": results["sampling_device_seconds"]}}
    out = Path(cfg.output_dir)
    if cfg.sampler_table.enabled:
        done = {_key(sampler, num_samples, module.diffusion.num_timesteps): (results, protocol)}
        report["sampler_table"] = sampler_table(cfg, module, datamodule, extractor, weights, out, done=done)
    if rank_zero_only.rank == 0:
        _write(report, out, cfg)
    job_status.record(step=posthoc["step"] if posthoc else None, metrics=_scores(report), weights=weights,
                      quality={f"eval/{k}": v for k, v in report["quality"].items()}, quality_protocol=protocol)
    return report


def _key(sampler: SamplerSpec, n: int, num_timesteps: int) -> str:
    return json.dumps([sampler.describe(num_timesteps), n], sort_keys=True)


def sampler_table(cfg: DictConfig, module, datamodule, extractor: str, weights: str, out: Path,
                  done: dict) -> list[dict]:
    """Each sampler of cfg.sampler_table.samplers: seconds per image and quality, as Markdown and a plot.

    `done` holds passes already made (the main one), reused when sampler and sample count are the same."""
    rows, T = [], module.diffusion.num_timesteps
    n = cfg.sampler_table.num_samples or cfg.num_samples or datamodule.eval_num_samples
    for sampler in OmegaConf.to_container(cfg.sampler_table.samplers, resolve=True):
        sampler = as_sampler_spec(sampler)
        if _key(sampler, n, T) not in done:
            done[_key(sampler, n, T)] = _pass(cfg, module, datamodule, extractor, weights, sampler, n, bpd=False)
        results, protocol = done[_key(sampler, n, T)]
        rows.append({"sampler": sampler.label(T), "steps": protocol["sampler"]["steps"],
                     "seconds_per_image": results["sampling_device_seconds"] / n, **results["quality"],
                     "protocol_id": protocol_id(protocol)})
    if rank_zero_only.rank == 0:
        _write_table(rows, n, extractor, out)
    return rows


def _write(report: dict, out: Path, cfg: DictConfig) -> None:
    """The JSON report, the W&B summary (offline by default) and the lines `evaluate.py` prints."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    scores = _scores(report)
    if cfg.logger is not None:
        logger = instantiate(cfg.logger, **sweep_info(cfg).get("wandb", {}))
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "protocol": report["protocol"],
                                "protocol_id": report["protocol_id"]})
        logger.experiment.summary.update(scores)
        import wandb

        wandb.finish()
    print(f"quality: {describe(_train_first(report['quality']), report['protocol'])}")
    if report["nll"] is not None:
        nll = report["nll"]
        print(f"NLL: {nll['bpd']:.4f} bits/dim on {cfg.bpd.split} (prior term {nll['prior_bpd']:.2e})")
    print(f"report: {out / 'report.json'}")


def _scores(report: dict) -> dict[str, float]:
    """The report's numbers as eval/<name> (the W&B summary's keys and status.json's metrics)."""
    scores = {f"eval/{k}": v for k, v in report["quality"].items()}
    if report["nll"] is not None:
        scores.update({f"eval/{k}": v for k, v in report["nll"].items()})
    return scores


def _train_first(quality: dict) -> dict:
    order = ["fid_train", "is", "kid_train", "precision_train", "recall_train", "fid_val"]
    return {k: quality[k] for k in order if k in quality} | {k: v for k, v in quality.items() if k not in order}


def _write_table(rows: list[dict], n: int, extractor: str, out: Path) -> None:
    """samplers.md (time and quality per sampler) and samplers.png (FID against seconds per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Sampler comparison: {n} samples each, scores in the `{extractor}` feature space against the train "
             "split (FID, KID) and of the samples alone (IS).", "",
             "| sampler | steps | s / image | FID (train) | IS | KID (train) | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['seconds_per_image']:.4f} | {r['fid_train']:.4g} | "
                     f"{r.get('is', float('nan')):.3g} | {r['kid_train']:.3g} | {r['precision_train']:.3f} | "
                     f"{r['recall_train']:.3f} |")
    (out / "samplers.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for family in dict.fromkeys(r["sampler"].split("-")[0] for r in rows):
        pts = [r for r in rows if r["sampler"].split("-")[0] == family]
        ax.plot([r["seconds_per_image"] for r in pts], [r["fid_train"] for r in pts], "o-", label=family)
        for r in pts:
            ax.annotate(str(r["steps"]), (r["seconds_per_image"], r["fid_train"]), fontsize=7)
    ax.set(xscale="log", xlabel="seconds per image", ylabel=f"FID ({extractor} features, train)",
           title=f"Samplers: time vs quality ({n} samples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "samplers.png", dpi=120)
    plt.close(fig)
    print(f"sampler table: {out / 'samplers.md'} and {out / 'samplers.png'}")
