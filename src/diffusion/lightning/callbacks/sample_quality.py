"""FID (vs train and vs the held-out split), KID, IS and precision/recall of fresh samples during training.

Every N steps and at the end, M samples are drawn with the EMA weights (`diffusion.core.sampling.draw`: chunks of
`batch_size`, each image from its own noise, shared out over the ranks, so the score does not depend on the
number of processes) and scored by `SampleQuality`. The reference features are extracted at the first evaluation only.
Each of `extra_samplers` draws its own M samples, scored against the same reference features and logged with
the suffix `@<sampler tag>`: `val/fid@dpmpp_2m-10`, `val/is@unipc-20`, ... (the printed line is the main one's).
"""

import sys
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from diffusion.core.images import to_uint8
from diffusion.core.sampling import SamplerSpec, draw_chunks, sampler_spec
from diffusion.errors import UserError
from diffusion.lightning.callbacks.ema import averaged_net
from diffusion.metrics.quality import SampleQuality, brief_keys, describe, logged_name, make_protocol, protocol_id


def metric_names(scores: dict[str, float]) -> dict[str, float]:
    """SampleQuality's keys -> logged names: vs train `val/fid`, vs val (the held-out split) `val/fid_test`."""
    return {logged_name(k): v for k, v in scores.items()}


def shown_names() -> list[str]:
    """The logged names the periodic line prints (the scores' short list)."""
    return [logged_name(k) for k in brief_keys()]


class SampleQualityCallback(L.Callback):
    """Every `every_n_steps` steps (0: never) and at the end of training: sample, score, log, print one line."""

    def __init__(self, *, every_n_steps: int, num_samples: int, batch_size: int, sampler: SamplerSpec | dict,
                 seed: int, feature_extractor: Mapping | str, reference_splits: "list[str] | tuple[str, ...]",
                 max_reference_images: int | None, weights: str, at_train_end: bool,
                 extra_samplers: "list[SamplerSpec | dict] | tuple", fd_dinov2: Mapping | bool | None):
        """A validated config's values (callbacks.quality: its schema's rules); samplers as SamplerSpecs or their
        fields, the feature extractor as its settings (or a name); fd_dinov2 as its settings (None or enabled=false:
        off)."""
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.sampler = sampler_spec(sampler)
        self.extra_samplers = [sampler_spec(spec) for spec in extra_samplers]
        self.extra_tags: list[str] = []
        spec = feature_extractor
        self.feature_extractor = dict(spec) if isinstance(spec, Mapping) else spec  # plain values, picklable
        self.fd_dinov2 = dict(fd_dinov2) if isinstance(fd_dinov2, Mapping) else fd_dinov2
        self.reference_splits, self.max_reference_images = tuple(reference_splits), max_reference_images
        self.weights, self.at_train_end = weights, at_train_end
        self.metric: SampleQuality | None = None
        self.last_scores: dict[str, float] = {}  # the main sampler's
        self.extra_scores: dict[str, float] = {}  # every extra sampler's, as `val/<score>@<tag>`
        self.protocol: dict | None = None
        self.extra_protocols: dict[str, dict] = {}  # each extra sampler's: the main one's with its sampler
        self._last_step, self._logged_protocol = -1, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, at_end=True)

    def _net(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> tuple[torch.nn.Module, str]:
        """The EMA network if asked for and there is one, else the raw one; and which it is.

        At the end of training EMA's on_train_end may already have copied the average into pl_module; the
        averaged copy is unchanged by that, so `ema` is never averaged twice, but `raw` may be gone.
        """
        averaged = averaged_net(trainer)
        if self.weights == "ema" and averaged is not None:
            return averaged, "ema"
        if self.weights == "ema":
            rank_zero_warn("callbacks.quality.weights=ema but there is no EMA callback: scoring the raw weights")
        elif averaged is not None and at_end and all(
                torch.equal(a, b) for a, b in zip(pl_module.net.parameters(), averaged.parameters(), strict=True)):
            return pl_module.net, "ema"  # the raw weights were overwritten: say what is really scored
        return pl_module.net, "raw"

    def preflight(self, datamodule) -> None:
        """Before anything runs: the data module and the extractor (a missing Inception file, an unwritable cache
        folder fail here, not at the first evaluation)."""
        if self.metric is not None or (self.every_n_steps == 0 and not self.at_train_end):
            return  # switched off (every_n_steps=0, at_train_end=false): no extractor is built
        if not hasattr(datamodule, "reference_images"):
            raise UserError("callbacks.quality needs a data module with reference_images() (fit(datamodule=...)); "
                            "or set callbacks.quality=null")
        self.metric = SampleQuality(self.feature_extractor, dinov2=self.fd_dinov2)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first step: the samplers against T, then preflight (a no-op when train() already ran it)."""
        if stage != "fit" or (self.every_n_steps == 0 and not self.at_train_end):
            return
        self.extra_tags = self._tags(pl_module.objective)
        self.preflight(trainer.datamodule)
        self.metric = self.metric.to(pl_module.device)

    def _set_references(self, trainer: L.Trainer) -> None:
        """The real images' features, at the first evaluation only (every rank takes part)."""
        for split in self.reference_splits:
            images = trainer.datamodule.reference_images(split, self.max_reference_images or sys.maxsize)
            self.metric.set_reference(split, images, batch_size=self.batch_size)

    def _tags(self, objective) -> list[str]:
        """The extra samplers' metric suffixes on this objective (distinct: the config's validation says so)."""
        return [spec.tag(objective) for spec in self.extra_samplers]

    def generate_and_update(self, metric: SampleQuality, net, pl_module, rank: int, world_size: int,
                            sampler: SamplerSpec | None = None) -> None:
        """This rank's chunks of the M samples (of `sampler`, default the main one) into the metric (see
        diffusion.core.sampling.draw)."""
        chunks = draw_chunks(net, pl_module.objective, sampler or self.sampler, self.num_samples,
                             shape=net.image_shape, seed=self.seed, chunk_size=self.batch_size, rank=rank,
                             world_size=world_size, device=pl_module.device)
        for chunk in chunks:
            metric.update(to_uint8(chunk.images), chunk.index)
        if not metric.update_count:  # fewer chunks than ranks: this one still takes part in the gather
            metric.update(torch.zeros(0, *net.image_shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool = False) -> dict[str, float]:
        """Sample, score against every reference split, log to every logger and print one line on rank 0."""
        self._last_step = trainer.global_step
        if self.metric is None:
            self.preflight(trainer.datamodule)
        self.metric.to(pl_module.device)  # a no-op after the first time
        if not self.metric.references:
            self._set_references(trainer)
        net, weights = self._net(trainer, pl_module, at_end)
        self.last_scores = self._score(net, trainer, pl_module, self.sampler)
        self.protocol = self._protocol(pl_module, weights, self.sampler)
        if not self.extra_tags and self.extra_samplers:
            self.extra_tags = self._tags(pl_module.objective)
        self.extra_scores, self.extra_protocols = {}, {}
        for tag, sampler in zip(self.extra_tags, self.extra_samplers, strict=True):
            scores = self._score(net, trainer, pl_module, sampler)
            self.extra_scores.update({f"{name}@{tag}": value for name, value in scores.items()})
            self.extra_protocols[tag] = self._protocol(pl_module, weights, sampler)
        self._log(trainer, pl_module)
        return self.last_scores

    def _score(self, net, trainer: L.Trainer, pl_module: L.LightningModule, sampler: SamplerSpec) -> dict[str, float]:
        """M samples of `sampler` scored against the reference features computed once (`val/fid`, ...)."""
        self.metric.reset()  # the generated features only: the references survive
        self.generate_and_update(self.metric, net, pl_module, trainer.global_rank, trainer.world_size, sampler)
        return metric_names(self.metric.compute())  # gathers every rank's features

    def _protocol(self, pl_module: L.LightningModule, weights: str, sampler: SamplerSpec) -> dict:
        metric = self.metric
        return make_protocol(
            num_generated=self.num_samples, extractor=metric.extractor, sampler=sampler, weights=weights,
            reference_sizes={split: len(ref.features) for split, ref in metric.references.items()},
            objective=pl_module.objective, seed=self.seed,
            settings=metric.settings(self.num_samples), dinov2=metric.dinov2)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scores = {**self.last_scores, **self.extra_scores}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scores.items()})
        pid = protocol_id(self.protocol)
        protocols = {"quality_protocol": self.protocol, "quality_protocol_id": pid}
        extra_ids = {tag: protocol_id(protocol) for tag, protocol in self.extra_protocols.items()}
        if extra_ids:  # each extra sampler's protocol is the main one's with its sampler
            protocols["quality_extra_protocol_ids"] = extra_ids
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(scores, step=trainer.global_step)
                if (pid, extra_ids) != self._logged_protocol:
                    logger.log_hyperparams(protocols)
                    if isinstance(logger, WandbLogger):
                        logger.experiment.summary.update(protocols)
        self._logged_protocol = (pid, extra_ids)
        shown = {k: self.last_scores[k] for k in shown_names() if k in self.last_scores} or self.last_scores
        pl_module.print(describe(shown, self.protocol))  # rank 0 only
