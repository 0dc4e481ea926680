"""evaluate(cfg): sample quality and bits/dim of a checkpoint, a JSON report, W&B summary, a sampler table."""

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffusion.core.sampling import SamplerSpec, check_guidance, check_index, draw_labels, sampler_label
from diffusion.errors import UserError
from diffusion.files import write_file
from diffusion.lightning.callbacks import training_time
from diffusion.lightning.callbacks.interrupt import default_requeue_signal, requeue_job
from diffusion.lightning.checkpoints import check_checkpoint, check_matches, load_weights
from diffusion.lightning.evaluation import Evaluator
from diffusion.lightning.module import ODE_LEVELS
from diffusion.metrics.features import state_sha256
from diffusion.metrics.quality import (
    PRIMARY,
    SampleQuality,
    brief_keys,
    column_title,
    describe,
    make_protocol,
    protocol_id,
)
from diffusion.metrics.shards import FeatureShards, tensor_sha256
from diffusion.rules import parse_numbers
from diffusion.run.commands.figures import check_data_fits
from diffusion.run.jobs import status as job_status
from diffusion.run.jobs.console import quiet_console
from diffusion.run.jobs.preflight import build_trainer, check_device, check_logger, writable_dir
from diffusion.run.jobs.stopping import stop_on_signals, written_since
from diffusion.run.jobs.sweep import sweep_info
from diffusion.run.reports.guidance_table import (
    best_row,
    guidance_rows,
    guidance_samplers,
    log_guidance_table,
    write_guidance_table,
)
from diffusion.run.reports.sampler_table import log_table, table_rows, table_samplers, tuned_rows, write_table


@dataclass
class Tuned:
    """The sampler table's consistency-tuned model: its module, its samplers, (training seconds, devices) or None."""

    module: object
    specs: list[SamplerSpec]
    time: tuple[float, str] | None


def _setup(cfg: DictConfig):
    """The checkpoint's module, the data it was trained on (checked by shape), the feature extractor's name and
    the sampler table's samplers (every sampler checked against the model's objective before anything is drawn)."""
    writable_dir(cfg.output_dir, "output_dir")
    if cfg.shards.dir is not None:
        writable_dir(cfg.shards.dir, "shards.dir")
    check_logger(cfg.logger)
    if cfg.accelerator in ("gpu", "cuda"):
        check_device("cuda", "accelerator")
    module, weights, posthoc = _load(cfg)
    sampler = _sampler(cfg).check_for(module.objective)
    check_guidance(sampler.guidance_scale, module.num_classes, cond_drop_prob=module.cond_drop_prob)
    if cfg.bpd.enabled and _bpd_method(cfg, module) not in module.objective.likelihoods:
        raise UserError(f"bpd.method={cfg.bpd.method}: objective={module.objective.name} has only "
                        f"{list(module.objective.likelihoods)} (the bound is DDPM's Eq. 5); use bpd.method=ode")
    table = table_samplers(cfg.sampler_table, module.objective) if cfg.sampler_table.enabled else []
    tuned = _tuned(cfg, module) if cfg.sampler_table.enabled and cfg.sampler_table.tuned_ckpt else None
    if cfg.guidance_table is not None:  # every scale checked before any sampling
        guidance_samplers(list(cfg.guidance_table), sampler, module.num_classes, module.cond_drop_prob)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    check_data_fits(datamodule, module, cfg.ckpt)
    extractor = cfg.feature_extractor.name
    if extractor == "auto":
        extractor = datamodule.quality_extractor
    return module, datamodule, extractor, (table, tuned), weights, posthoc, _index(cfg, datamodule)


def _index(cfg: DictConfig, datamodule):
    """seeds: the image numbers to draw, None for all of them; a part of them only into shards.dir, and then
    nothing else (the evaluation without seeds scores them all, and computes what is not per image)."""
    num_samples = cfg.num_samples or datamodule.eval_num_samples
    if cfg.seeds is None:
        return None
    index = check_index(parse_numbers(cfg.seeds), num_samples)
    if len(index) == num_samples:
        return None
    part = f"seeds={cfg.seeds} draws {len(index)} of the num_samples={num_samples} images"
    if cfg.shards.dir is None:
        raise UserError(f"{part}: their features go into shards, give shards.dir=DIR (the same for every part); "
                        "`evaluate.py shards.dir=DIR` without seeds then scores them all")
    for key, on in (("bpd.enabled", cfg.bpd.enabled), ("sampler_table.enabled", cfg.sampler_table.enabled),
                    ("guidance_table", cfg.guidance_table is not None)):
        if on:
            raise UserError(f"{part} (a part, into shards): {key} would be computed by every part; set "
                            f"{key}={'null' if key == 'guidance_table' else 'false'} here, the evaluation without "
                            "seeds computes it")
    return index


def shards_root(cfg: DictConfig) -> Path | None:
    """shards.dir, else <output_dir>/shards in a SLURM job (its folder is named by the job id, kept across requeues:
    a requeued evaluation finds them), else None."""
    if cfg.shards.dir is not None:
        return Path(cfg.shards.dir)
    return Path(cfg.output_dir) / "shards" if os.environ.get("SLURM_JOB_ID") else None


def _shards(cfg: DictConfig, module, metric: SampleQuality, sampler: SamplerSpec, num_samples: int):
    """The feature shards of this draw (see metrics/shards.py), or None without shards.dir."""
    root = shards_root(cfg)
    if root is None:
        return None
    objective = module.objective
    descriptor = {"net_sha256": state_sha256(module.net), "objective": objective.protocol(),
                  "sampler": sampler.describe(objective), "seed": cfg.seed, "noise_block": cfg.noise_block,
                  "num_samples": num_samples, "labels_sha256": tensor_sha256(draw_labels(module.net, sampler,
                                                                                          num_samples)),
                  **metric.extraction()}
    shards = FeatureShards(root, descriptor, keep_images=cfg.shards.images)
    shards.prepare()
    return shards


def _tuned(cfg: DictConfig, module) -> Tuned:
    """sampler_table.tuned_ckpt: a consistency-tuned run of this model (same network, tuned from this objective),
    its module with the same choice of weights, its samplers checked, and the seconds its tuning took."""
    path = cfg.sampler_table.tuned_ckpt
    ckpt = check_checkpoint(path, key="sampler_table.tuned_ckpt")
    tuned, _, _ = load_weights(path, cfg.weights, None)
    if getattr(tuned.objective, "tunes", None) is None:
        raise UserError(f"sampler_table.tuned_ckpt={path} is a model of objective={tuned.objective.name}, not a tuned "
                        "one; give the checkpoint of a `train.py objective=consistency init_from=<this ckpt>` run")
    check_matches(Path(path), ckpt["hyper_parameters"], {"net": module.hparams["net"], "objective":
                  module.objective.spec()}, start_over="give a run tuned from ckpt", option="sampler_table.tuned_ckpt")
    specs = [SamplerSpec(name="consistency", steps=k).check_for(tuned.objective, f"sampler_table.tuned_steps[{i}]")
             for i, k in enumerate(cfg.sampler_table.tuned_steps)]
    return Tuned(tuned, specs, training_time(ckpt))


def _load(cfg: DictConfig):
    """(module, the protocol's weights label, post-hoc EMA info or None): weights=ema|raw, or ema.sigma_rel."""
    module, weights, info = load_weights(cfg.ckpt, cfg.weights, cfg.ema.sigma_rel, cfg.ema.snapshot_dir)
    if info is not None and rank_zero_only.rank == 0:
        (lo, hi), step = info["range"], info["checkpoint_step"]
        at = f" (the checkpoint is at step {step})" if info["step"] != step else ""
        print(f"post-hoc EMA: σ_rel={cfg.ema.sigma_rel:g} at step {info['step']}{at} from {len(info['snapshots'])} "
              f"averages in {info['snapshot_dir']}, profile fit error {info['fit_error']:.2%}; these snapshots rebuild "
              f"σ_rel in about [{lo:.3f}, {hi:.3f}]")
    return module, weights, info


def _sampler(cfg: DictConfig) -> SamplerSpec:
    return SamplerSpec(**OmegaConf.to_container(cfg.sampler, resolve=True))


def _bpd_method(cfg: DictConfig, module) -> str:
    """bpd.method, else the objective's own: DDPM's bound, the ODE for the others."""
    return cfg.bpd.method or module.objective.likelihoods[0]


def _trainer(cfg: DictConfig) -> L.Trainer:
    """Every device of the machine (devices=auto), one process each; Lightning's progress bar with its ETA. The test
    loop runs under no_grad, not Lightning's default torch.inference_mode: the ODE likelihood takes the divergence
    of the denoiser by autograd, which inference mode cannot re-enable."""
    accelerator = "gpu" if torch.cuda.is_available() and cfg.accelerator == "auto" else cfg.accelerator
    devices = cfg.devices if cfg.devices != "auto" else (torch.cuda.device_count() if accelerator == "gpu" else 1)
    return build_trainer(L.Trainer, accelerator=accelerator, devices=devices,
                         strategy="ddp" if devices != 1 else "auto", logger=False, use_distributed_sampler=False,
                         enable_checkpointing=False, enable_progress_bar=cfg.progress_bar, enable_model_summary=False,
                         inference_mode=False)


def _pass(cfg, module, datamodule, metric: SampleQuality, weights: str, sampler: SamplerSpec, num_samples: int,
          bpd: bool, index=None) -> tuple[dict, dict]:
    """One test loop: scores (and bits/dim if asked) and the protocol they were made under. The metric keeps
    the reference features of its first pass: one feature pass of the real images per run. `index`: only these
    images, into the shards (see _index)."""
    refs = {split: datamodule.reference_images(split, cfg.max_reference_images or sys.maxsize)
            for split in cfg.reference_splits} if index is None else {}
    bpd_images = datamodule.reference_images(cfg.bpd.split, cfg.bpd.num_images or sys.maxsize) if bpd else None
    shards = _shards(cfg, module, metric, sampler, num_samples)
    evaluator = Evaluator(module, sampler, num_samples, cfg.batch_size, cfg.seed, metric, refs, bpd_images,
                          cfg.bpd.batch_size, _bpd_method(cfg, module), cfg.bpd.ode_levels or ODE_LEVELS, index=index,
                          noise_block=cfg.noise_block, shards=shards)
    if shards is not None and rank_zero_only.rank == 0:
        there = len(evaluator.asked) - len(evaluator.todo)
        print(f"feature shards: {shards.dir} ({there} of the {len(evaluator.asked)} images asked for are there, "
              f"{len(evaluator.todo)} to draw)", flush=True)
    trainer = _trainer(cfg)
    began = time.perf_counter()
    trainer.test(evaluator, verbose=False)
    results = {**evaluator.results, "wall_seconds": time.perf_counter() - began, "devices": trainer.world_size}
    protocol = make_protocol(
        num_generated=num_samples, reference_sizes={split: len(r) for split, r in refs.items()},
        extractor=metric.extractor, sampler=sampler, objective=module.objective, weights=weights, seed=cfg.seed,
        settings=metric.settings(num_samples), dinov2=metric.dinov2, noise_block=cfg.noise_block)
    if shards is not None:
        results["shards"] = {"dir": str(shards.dir), "images": len(shards.load(with_states=False).index),
                             "of": num_samples}
    return results, protocol


def evaluate(cfg: DictConfig) -> dict:
    """FID/IS/KID/precision/recall of N samples against the training set, NLL in bits/dim on the test split.

    SIGTERM or Ctrl-C stops it at once, saying whether the report was written (see run/stopping.py)."""
    quiet_console()
    out, began, root = Path(cfg.output_dir), time.time(), shards_root(cfg)

    def what_is_written() -> str:
        written = [p.name for p in written_since(out, began)]
        shards = "" if root is None else \
            f"; {len(list(root.glob('*/chunk-*.pt')))} chunks' features are in {root}, the same command resumes " \
            "from them"
        if "report.json" in written:
            return f"written to {out}: {', '.join(written)}{shards}"
        return f"the report ({out / 'report.json'}) was not written" + (
            f"; written to {out}: {', '.join(written)}" if written else "") + shards

    requeue = None
    if root is not None and os.environ.get("SLURM_JOB_ID"):  # SLURM's pre-timeout signal: requeue, then resume
        signum = signal.Signals[default_requeue_signal()]
        requeue = (signum, lambda line, previous: requeue_job(signum, previous, line, rank_zero_only.rank == 0,
                                                              resumes=f"the feature shards in {root}"))
    with stop_on_signals(what_is_written, requeue):
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict:
    module, datamodule, extractor, table, weights, posthoc, index = _setup(cfg)
    num_samples = cfg.num_samples or datamodule.eval_num_samples
    sampler = _sampler(cfg)
    # the extractors first: a missing weights file is one line before anything is printed or sampled
    metric = SampleQuality({**OmegaConf.to_container(cfg.feature_extractor, resolve=True), "name": extractor},
                           dinov2=OmegaConf.to_container(cfg.fd_dinov2, resolve=True))
    if index is not None:
        return _evaluate_part(cfg, module, datamodule, metric, weights, sampler, num_samples, index)
    if rank_zero_only.rank == 0:
        bpd = f", bits/dim on the {cfg.bpd.split} split" if cfg.bpd.enabled else ""
        print(f"evaluating {cfg.ckpt}: {num_samples} samples ({sampler.label(module.objective)}) "
              f"against {datamodule.name}{bpd}", flush=True)
    results, protocol = _pass(cfg, module, datamodule, metric, weights, sampler, num_samples, bpd=cfg.bpd.enabled)
    report = {"checkpoint": str(Path(cfg.ckpt).resolve()), "data": datamodule.name, "weights": weights,
              "posthoc_ema": posthoc, "protocol": protocol,
              "protocol_id": protocol_id(protocol), "quality": results["quality"], "nll": results.get("nll"),
              "nll_protocol": _nll_protocol(cfg, module) if cfg.bpd.enabled else None,
              "timing": {"wall_seconds": results["wall_seconds"], "devices": results["devices"],
                         "sampling_device_seconds": results["sampling_device_seconds"]}}
    out = Path(cfg.output_dir)
    if cfg.sampler_table.enabled:
        done = {_key(sampler, num_samples, module.objective): (results, protocol)}
        report["sampler_table"] = sampler_table(cfg, module, datamodule, metric, weights, table, done=done)
    if cfg.guidance_table is not None:
        done = {_key(sampler, num_samples, module.objective): (results, protocol)}
        report["guidance_table"] = guidance_table(cfg, module, datamodule, metric, weights, sampler, num_samples, done)
    if rank_zero_only.rank == 0:
        _write(report, out, cfg, extractor)
    job_status.record(step=posthoc["step"] if posthoc else None, metrics=_scores(report), weights=weights,
                      quality={f"eval/{k}": v for k, v in report["quality"].items()}, quality_protocol=protocol,
                      quality_protocol_id=report["protocol_id"])
    return report


def _evaluate_part(cfg: DictConfig, module, datamodule, metric: SampleQuality, weights: str, sampler: SamplerSpec,
                   num_samples: int, index) -> dict:
    """seeds=a part of the images: their features into the shards, no score (see _index)."""
    if rank_zero_only.rank == 0:
        print(f"evaluating {cfg.ckpt}: images {cfg.seeds} ({len(index)} of {num_samples}, "
              f"{sampler.label(module.objective)}) into feature shards", flush=True)
    results, protocol = _pass(cfg, module, datamodule, metric, weights, sampler, num_samples, bpd=False, index=index)
    shards = results["shards"]
    if rank_zero_only.rank == 0:
        rest = "all of them: score them with the same command without seeds" if shards["images"] == num_samples \
            else "the score needs all of them: run the other parts, then the same command without seeds"
        print(f"shards: {shards['dir']} holds the features of {shards['images']} of the {num_samples} images; {rest}")
    job_status.record(step=None, metrics={}, weights=weights)
    return {"shards": shards, "protocol": protocol}


def _key(sampler: SamplerSpec, n: int, objective) -> str:
    return json.dumps([sampler.describe(objective), n], sort_keys=True)


def _nll_protocol(cfg: DictConfig, module) -> dict:
    """How the bits/dim were computed: DDPM's bound (discretized decoder, T terms), or the ODE's settings."""
    method, split = _bpd_method(cfg, module), {"split": cfg.bpd.split, "num_images": cfg.bpd.num_images}
    if method == "bound":
        return {**split, "decoder": "discretized", "num_timesteps": module.objective.num_levels}
    return {**split, "method": "ode", "levels": cfg.bpd.ode_levels or ODE_LEVELS, "trace": "hutchinson",
            "dequantization": "uniform"}


def sampler_table(cfg: DictConfig, module, datamodule, metric: SampleQuality, weights: str,
                  table: tuple[list[SamplerSpec], Tuned | None], done: dict) -> list[dict]:
    """The rows of the sampler table (diffusion.run.reports.sampler_table), then a tuned model's; `done` holds passes
    already made (the main one), reused when sampler and sample count are the same."""
    objective, (table, tuned) = module.objective, table
    n = cfg.sampler_table.num_samples or cfg.num_samples or datamodule.eval_num_samples

    def run(sampler: SamplerSpec) -> tuple[dict, dict]:
        if _key(sampler, n, objective) not in done:
            done[_key(sampler, n, objective)] = _pass(cfg, module, datamodule, metric, weights, sampler, n, bpd=False)
        return done[_key(sampler, n, objective)]

    rows = table_rows(table, run, n, objective)
    if tuned is None:
        return rows

    def tuned_run(sampler: SamplerSpec) -> tuple[dict, dict]:
        return _pass(cfg, tuned.module, datamodule, metric, weights, sampler, n, bpd=False)

    seconds, devices = tuned.time or (None, None)
    return rows + tuned_rows(table_rows(tuned.specs, tuned_run, n, tuned.module.objective), seconds, devices)


def guidance_table(cfg: DictConfig, module, datamodule, metric: SampleQuality, weights: str, sampler: SamplerSpec,
                   n: int, done: dict) -> list[dict]:
    """The rows of the guidance table (run/reports/guidance_table.py): the sampler at each w of cfg.guidance_table;
    a pass already made (`done`, the main one) is reused."""
    objective = module.objective

    def run(spec: SamplerSpec) -> tuple[dict, dict]:
        if _key(spec, n, objective) not in done:
            done[_key(spec, n, objective)] = _pass(cfg, module, datamodule, metric, weights, spec, n, bpd=False)
        return done[_key(spec, n, objective)]

    return guidance_rows(guidance_samplers(list(cfg.guidance_table), sampler, module.num_classes,
                                           module.cond_drop_prob), run, n)


def _write(report: dict, out: Path, cfg: DictConfig, extractor: str) -> None:
    """The JSON report, the sampler table's files, the W&B summary, table and plot (offline by default) and the
    lines `evaluate.py` prints."""
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "report.json", json.dumps(report, indent=2))
    rows = report.get("sampler_table")
    if rows:
        _, png = write_table(rows, rows[0]["num_samples"], extractor, out)
    guided = report.get("guidance_table")
    if guided:
        unguided = {**report["protocol"]["sampler"], "guidance_scale": None}
        _, guided_png = write_guidance_table(guided, sampler_label(unguided), extractor, out)
    scores = _scores(report)
    if cfg.logger is not None:
        logger = instantiate(cfg.logger, **sweep_info(cfg).get("wandb", {}))
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "protocol": report["protocol"],
                                "protocol_id": report["protocol_id"]})
        logger.experiment.summary.update(scores)
        if rows:
            log_table(logger, rows, png)
        if guided:
            log_guidance_table(logger, guided, guided_png)
        import wandb

        wandb.finish()
    print(f"quality: {describe(_train_first(report['quality']), report['protocol'])}")
    if report["nll"] is not None:
        nll = report["nll"]
        prior = f" (prior term {nll['prior_bpd']:.2e})" if "prior_bpd" in nll else " (probability-flow ODE)"
        print(f"NLL: {nll['bpd']:.4f} bits/dim on {cfg.bpd.split}{prior}")
    if guided:
        best = best_row(guided)
        accuracy = f", class accuracy {best['class_accuracy']:.1%}" if "class_accuracy" in best else ""
        print(f"best guidance: w={best['guidance_scale']:g}{accuracy}, {column_title(PRIMARY)} {best[PRIMARY]:.4g}")
    print(f"report: {out / 'report.json'}")


def _scores(report: dict) -> dict[str, float]:
    """The report's numbers as eval/<name> (the W&B summary's keys and status.json's metrics)."""
    scores = {f"eval/{k}": v for k, v in report["quality"].items()}
    if report["nll"] is not None:
        scores.update({f"eval/{k}": v for k, v in report["nll"].items()})
    return scores


def _train_first(quality: dict) -> dict:
    order = brief_keys()
    return {k: quality[k] for k in order if k in quality} | {k: v for k, v in quality.items() if k not in order}
