"""Evaluation of a trained model as a Lightning test loop, so it shards over every device with a progress bar.

Dataloader 0 deals out chunks of the N generated samples (each image from its own noise, core/sampling/draw.py:
the samples do not depend on the batch size or the device count); their features go into one `SampleQuality`
metric that torchmetrics syncs across ranks. With feature shards (metrics/shards.py) every chunk's features are
also saved as it is drawn, and the images whose features are already there are not drawn again: a preempted
evaluation resumes, and one that draws only some of the images (`index`, a SLURM array task's range) leaves
its shards for the evaluation that scores them all. Dataloader 1 deals out this rank's share of
the test images, for which the NLL in bits/dim is computed: DDPM's full variational bound (T network evaluations
per image, batched, with the discretized decoder L_0; Ho et al. 2020 Table 2) or, for any objective, the
probability-flow ODE's (core/ode_likelihood.py).
"""

import time

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric

from diffusion.core.images import to_model_range, to_uint8
from diffusion.core.sampling import NOISE_BLOCK, SamplerSpec, chunk_bounds, draw_chunk, draw_labels, index_chunks
from diffusion.lightning.module import DiffusionModule
from diffusion.metrics.quality import SampleQuality
from diffusion.metrics.shards import FeatureShards


class Evaluator(L.LightningModule):
    """`trainer.test(Evaluator(...))`: sample quality of N samples and/or bits/dim of test images."""

    def __init__(self, model: DiffusionModule, sampler: SamplerSpec, num_samples: int, batch_size: int, seed: int,
                 metric: SampleQuality | None, references: dict[str, Tensor], bpd_images: Tensor | None,
                 bpd_batch_size: int, bpd_method: str = "bound", ode_levels: int = 100, index: Tensor | None = None,
                 noise_block: int = NOISE_BLOCK, shards: FeatureShards | None = None):
        super().__init__()
        self.model, self.metric = model.eval(), metric
        self.sampler, self.num_samples, self.batch_size, self.seed = sampler, num_samples, batch_size, seed
        self.references, self.bpd_images, self.bpd_batch_size = references, bpd_images, bpd_batch_size
        self.bpd_method, self.ode_levels = bpd_method, ode_levels
        self.bpd, self.prior_bpd, self.x0_mse = MeanMetric(), MeanMetric(), MeanMetric()
        self.sampling_seconds = SumMetric()  # summed over ranks: device-seconds spent sampling
        self.kinds: list[str] = []
        self.results: dict = {}
        self.labels = draw_labels(model.net, sampler, num_samples)  # (N,) class-conditional models: balanced
        self.noise_block, self.shards = noise_block, shards
        self.asked = torch.arange(num_samples) if index is None else index  # the image numbers to score or shard
        self.partial = len(self.asked) < num_samples  # only shards: the score needs every image
        self.loaded = shards.load(with_states=not self.partial) if shards is not None else None
        # read here, before any rank draws: every rank deals out the same images still to draw
        self.todo = self.asked if self.loaded is None else \
            self.asked[~torch.isin(self.asked, self.loaded.index)]

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = self.global_rank, self.trainer.world_size
        loaders, self.kinds = [], []
        if self.metric is not None:
            chunks = index_chunks(self.todo, self.batch_size, rank, world)  # [(k, image numbers)]
            # None: nothing to draw here (all in the shards, or fewer chunks than ranks); Lightning skips a test loop
            # whose loaders are all empty, hooks included, and this rank must still take part in the score
            loaders.append(DataLoader(chunks or [None], batch_size=None))
            self.kinds.append("samples")
        if self.bpd_images is not None:  # fixed batches of the test images, dealt out like the sample chunks
            chunks = chunk_bounds(len(self.bpd_images), self.bpd_batch_size, rank, world)
            loaders.append(DataLoader(chunks, batch_size=None))
            self.kinds.append("bpd")
        return loaders

    def on_test_start(self) -> None:
        if self.metric is None:
            return
        self.metric.reset()  # a metric reused from an earlier pass keeps only its reference features
        names = self.metric.extractor.class_names
        classifies = names is not None and self.labels is not None and list(names) == list(self.model.class_names or [])
        self.metric.requested_labels = self.labels if classifies else None
        for name, images in self.references.items():  # every rank takes part: features computed in shards
            if name not in self.metric.references:
                self.metric.set_reference(name, images)
        if self.loaded is not None and not self.partial and self.global_rank == 0:  # once, not once per rank
            for part in self.loaded.parts:
                self.metric.add(part)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch is None:
            return
        if self.kinds[dataloader_idx] == "samples":
            self._sample_chunk(*batch)
        else:
            self._bound(*batch)

    def _sample_chunk(self, k, index) -> None:
        """Chunk k of the N samples, the images numbered `index` (see diffusion.core.sampling.draw), timed, into
        the metric and its shard."""
        net = self.model.net
        began = time.perf_counter()
        labels = None if self.labels is None else self.labels[index]
        x0 = draw_chunk(net, self.model.objective, self.sampler, index, shape=net.image_shape, seed=self.seed,
                        noise_block=self.noise_block, device=self.device, labels=labels).x0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.sampling_seconds.update(time.perf_counter() - began)
        images = to_uint8(x0)
        parts = self.metric.extract(images, index)
        if self.shards is not None:
            self.shards.save(int(k), parts, images)
        self.metric.add(parts)

    def _bound(self, k, start, stop) -> None:
        """Bits/dim of test-image batch k, its noise (the bound's x_t, the ODE's dequantization and probes) from a
        generator seeded by k: the Monte Carlo draws, and so the bits/dim, do not depend on the device count."""
        images = self.bpd_images[int(start):int(stop)].to(self.device)  # uint8 (B, C, H, W)
        gen = torch.Generator(device=self.device).manual_seed(self.seed + 1_000_003 + int(k))
        bpd = self.model.bits_per_dim(to_model_range(images), self.bpd_method, gen, ode_levels=self.ode_levels)
        self.bpd.update(bpd["bpd"])
        if "prior_bpd" in bpd:  # the bound's L_T and x̂0 errors
            self.prior_bpd.update(bpd["prior_bpd"])
            self.x0_mse.update(bpd["x0_mse"])

    def on_test_epoch_end(self) -> None:
        if self.metric is not None and self.partial:  # the features are in the shards; no score of a part
            self.results["sampling_device_seconds"] = float(self.sampling_seconds.compute())
        elif self.metric is not None:
            if not self.metric.update_count:  # fewer chunks than ranks: this rank still joins the gather
                self.metric.update(torch.zeros(0, *self.model.net.image_shape, dtype=torch.uint8, device=self.device),
                                   torch.zeros(0, dtype=torch.int64, device=self.device))
            self.results["quality"] = self.metric.compute()
            self.results["sampling_device_seconds"] = float(self.sampling_seconds.compute())
        if self.bpd_images is not None:
            self.results["nll"] = {"bpd": float(self.bpd.compute())}
            if self.bpd_method == "bound":
                self.results["nll"].update(prior_bpd=float(self.prior_bpd.compute()),
                                           x0_mse=float(self.x0_mse.compute()))
