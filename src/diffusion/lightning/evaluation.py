"""Evaluation of a trained model as a Lightning test loop, so it shards over every device with a progress bar.

Dataloader 0 deals out chunks of the N generated samples (chunk k from a generator seeded seed + k, rank r
taking k = r, r + W, ...: the samples do not depend on the device count); their features go into one
`SampleQuality` metric that torchmetrics syncs across ranks. Dataloader 1 deals out this rank's share of
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
from diffusion.core.sampling import SamplerSpec, chunk_bounds, draw_chunk, draw_labels
from diffusion.lightning.module import DiffusionModule
from diffusion.metrics.quality import SampleQuality


class Evaluator(L.LightningModule):
    """`trainer.test(Evaluator(...))`: sample quality of N samples and/or bits/dim of test images."""

    def __init__(self, model: DiffusionModule, sampler: SamplerSpec, num_samples: int, batch_size: int, seed: int,
                 metric: SampleQuality | None, references: dict[str, Tensor], bpd_images: Tensor | None,
                 bpd_batch_size: int, bpd_method: str = "bound", ode_levels: int = 100):
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

    def test_dataloader(self) -> list[DataLoader]:
        rank, world = self.global_rank, self.trainer.world_size
        loaders, self.kinds = [], []
        if self.metric is not None:
            chunks = chunk_bounds(self.num_samples, self.batch_size, rank, world)  # [(k, start, stop)]
            loaders.append(DataLoader(chunks, batch_size=None))
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

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.kinds[dataloader_idx] == "samples":
            self._sample_chunk(*batch)
        else:
            self._bound(*batch)

    def _sample_chunk(self, k, start, stop) -> None:
        """Chunk k of the N samples (see diffusion.core.sampling.draw), timed, into the metric."""
        net = self.model.net
        began = time.perf_counter()
        labels = None if self.labels is None else self.labels[int(start):int(stop)]
        x0 = draw_chunk(net, self.model.objective, self.sampler, int(k), int(stop) - int(start),
                        shape=net.image_shape, seed=self.seed, device=self.device, labels=labels).x0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.sampling_seconds.update(time.perf_counter() - began)
        self.metric.update(to_uint8(x0), torch.arange(int(start), int(stop)))

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
        if self.metric is not None:
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
