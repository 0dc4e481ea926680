"""FID, KID, Inception Score and precision/recall from ONE pass of a feature extractor over each image.

torchmetrics' FrechetInceptionDistance, KernelInceptionDistance and InceptionScore each own an extractor and
run it again on the same images (three passes per sample, and three over the reference set at every
evaluation), and none computes precision/recall. So `SampleQuality` runs the extractor once, keeps the
features, and reuses torchmetrics' functional math (`_compute_fid`, KID's `poly_mmd`) on them.

Generated features are metric states reduced by concatenation, so torchmetrics gathers them from every DDP
rank in `compute()`; each carries its sample index, and everything is computed in index order, so the scores
do not depend on how the samples were spread over ranks. Reference features are computed once per run by
`set_reference` and survive `reset()`.

FD-DINOv2 (Stein et al. 2023), switched on with `dinov2=`, is the same Fréchet distance in the features of a second
network, DINOv2 ViT-L/14: its features of generated images are one more state (gen_dinov2), of the real sets one
more pair of statistics, and its score `fd_dinov2` one more entry of SCORES.
"""

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from diffusion.core.objectives.base import Objective
from diffusion.core.sampling import NOISE_BLOCK, SamplerSpec, chunk_bounds, sampler_label
from diffusion.errors import UserError
from diffusion.metrics.features import FeatureExtractor, make_dinov2, make_feature_extractor


def knn_radii(features: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each row to its k-th nearest other row (Kynkäänniemi et al. 2019, Eq. 1's radii)."""
    return torch.cat([torch.cdist(features[i:i + chunk], features).kthvalue(k + 1, dim=1).values  # +1: itself
                      for i in range(0, len(features), chunk)])


def manifold_coverage(points: Tensor, centers: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """Share of `points` inside at least one ball (center, radius): Kynkäänniemi et al. 2019, Eq. 1-3."""
    inside = [(torch.cdist(points[i:i + chunk], centers) <= radii).any(dim=1) for i in range(0, len(points), chunk)]
    return torch.cat(inside).double().mean().item()


def inception_score(logits: Tensor, splits: int) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) per split, mean and std over splits (Salimans et al. 2016).

    The splits are drawn from the samples in a fixed random order (torch.randperm seeded 0), as torchmetrics
    shuffles before splitting: samples come in label order from a class-conditional model (balanced labels are
    sorted), and contiguous splits would each hold one or two classes, an IS near 1 whatever the samples."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(0)).to(logits.device)
    log_p = logits.double()[order].log_softmax(dim=1)  # (N, K)
    scores = []
    for part in log_p.chunk(splits):
        log_marginal = part.exp().mean(dim=0).log()  # log p(y) over the split
        scores.append((part.exp() * (part - log_marginal)).sum(dim=1).mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item()


@dataclass
class Reference:
    """A real image set's features and the statistics every evaluation compares against."""

    features: Tensor  # (N, D) float64
    mu: Tensor  # (D,)
    sigma: Tensor  # (D, D)
    radii: Tensor  # (N,) k-NN radii for precision
    dinov2: tuple[Tensor, Tensor] | None = None  # (mu (D,), sigma (D, D)) of its DINOv2 features, with FD-DINOv2


@dataclass(frozen=True)
class Samples:
    """What a score may read of the generated set (in sample order)."""

    features: Tensor  # (M, D) float64
    mu: Tensor  # (D,)
    sigma: Tensor  # (D, D)
    radii: Tensor  # (M,) k-NN radii, for recall
    logits: Tensor | None  # (M, K) where the extractor classifies, else None
    asked: Tensor | None  # (M,) the labels the samples were asked for, where known (guidance), else None
    dinov2: tuple[Tensor, Tensor] | None = None  # (mu, sigma) of their DINOv2 features, with FD-DINOv2


@dataclass(frozen=True)
class Score:
    """One number sample quality reports. SCORES is the one list of them: SampleQuality computes each, and
    the logged names (val/...), the printed lines, evaluate.py's report, the sampler and guidance tables, the
    sweep report and the model card all read their columns from it. A new score is one entry here."""

    name: str  # the result key: `fid` gives fid_train, fid_val (per reference set); `is` gives is
    title: str  # its column header in tables
    compute: "Callable[[SampleQuality, Samples, Reference | None], float | tuple[float, ...] | None]"
    extras: tuple[str, ...] = ()  # further numbers the same computation returns (kid -> kid_std)
    per_reference: bool = True  # against each reference set (train, val), or of the samples alone
    shown: str = "train"  # in short lists (printed line, tables, card): "all" its splits | "train" | "none"
    headline: bool = False  # in the sweep report's markdown table (report.csv has every score)
    fmt: str = ".3g"  # how tables print it
    logged_in_training: bool = True  # whether a training run logs it (class_accuracy: only guidance tables)

    def values(self, quality: "SampleQuality", samples: Samples, ref: "Reference | None") -> dict[str, float]:
        """{name: value, extra: value, ...}, or {} where it does not apply (IS without logits)."""
        got = self.compute(quality, samples, ref)
        if got is None:
            return {}
        got = got if isinstance(got, tuple) else (got,)
        return dict(zip((self.name, *self.extras), got, strict=True))


SCORES: tuple[Score, ...] = (
    Score("fid", "FD", lambda q, s, r: _compute_fid(r.mu, r.sigma, s.mu, s.sigma).item(), shown="all",
          headline=True, fmt=".4g"),
    Score("fd_dinov2", "FD-DINOv2", lambda q, s, r: None if s.dinov2 is None or r.dinov2 is None else
          _compute_fid(*r.dinov2, *s.dinov2).item(), shown="all", headline=True, fmt=".4g"),
    Score("kid", "KID", lambda q, s, r: q.kid(r.features, s.features), extras=("kid_std",)),
    Score("precision", "precision", lambda q, s, r: manifold_coverage(s.features, r.features, r.radii), fmt=".3f"),
    Score("recall", "recall", lambda q, s, r: manifold_coverage(r.features, s.features, s.radii), fmt=".3f"),
    Score("is", "IS", lambda q, s, r: None if s.logits is None else inception_score(s.logits, q.is_splits_for(
        len(s.logits))), extras=("is_std",), per_reference=False, shown="all", headline=True),
    Score("class_accuracy", "class accuracy", lambda q, s, r: None if s.asked is None else
          (s.logits.argmax(1) == s.asked).double().mean().item(), per_reference=False, shown="all", fmt=".3f",
          logged_in_training=False),
)
SPLITS = ("train", "val")  # the reference sets a run may score against (the data module's splits)
PRIMARY = "fid_train"  # the score choices rank by and plots draw (the best guidance scale, FD against NFE)


def result_keys(splits: "Sequence[str]", *, in_training: bool = False, dinov2: bool = True) -> list[str]:
    """The keys SampleQuality.compute may return against these reference sets, in its order (fd_dinov2's only
    with `dinov2`, FD-DINOv2 switched on)."""
    scores = [s for s in SCORES if (s.logged_in_training or not in_training) and (dinov2 or s.name != "fd_dinov2")]
    return [f"{n}_{split}" for split in splits for s in scores if s.per_reference for n in (s.name, *s.extras)] + \
        [n for s in scores if not s.per_reference for n in (s.name, *s.extras)]


def logged_name(key: str) -> str:
    """A result key's name in a training run's logs: fid_train -> val/fid, fid_val -> val/fid_test (the
    held-out split), is -> val/is."""
    for split, suffix in (("train", ""), ("val", "_test")):
        if any(key == f"{n}_{split}" for s in SCORES if s.per_reference for n in (s.name, *s.extras)):
            return f"val/{key.removesuffix('_' + split)}{suffix}"
    return f"val/{key}"


def brief_keys(splits: "Sequence[str]" = SPLITS) -> list[str]:
    """The result keys short lists show (the printed periodic line, tables, the model card), in SCORES order."""
    keys = []
    for s in SCORES:
        if s.shown == "none":
            continue
        if not s.per_reference:
            keys.append(s.name)
        else:
            keys += [f"{s.name}_{split}" for split in splits if s.shown == "all" or split == "train"]
    return keys


def is_headline(metric: str) -> bool:
    """Whether a logged score is a headline one: val/fid, val/fid_test, val/is, eval/fid_train, eval/fid_val..."""
    key = metric.split("/")[-1]
    return any(key == s.name or key in [f"{s.name}_{split}" for split in (*SPLITS, "test")]
               for s in SCORES if s.headline)


def score_of(key: str) -> Score | None:
    """The score a result key belongs to (its main number, not an extra): fid_val -> fid; kid_std_train -> None."""
    return next((s for s in SCORES if key == s.name or any(key == f"{s.name}_{x}" for x in SPLITS)), None)


def cell(key: str, value: float | None) -> str:
    """A table cell: the value in its score's format ('nan' where absent)."""
    score = score_of(key)
    return "nan" if value is None or math.isnan(value) else format(value, score.fmt if score else ".4g")


def score_cells(row: dict, keys: "Sequence[str]") -> list[float]:
    """A row's scores for a table's columns (nan where it has none), as numbers."""
    return [row.get(k, math.nan) for k in keys]


def column_title(key: str) -> str:
    """'FD (train)', 'FD (val)', 'IS', 'precision' (a brief list's train split goes unsaid, except FD's)."""
    score = score_of(key)
    split = key.removeprefix(score.name).lstrip("_")
    return f"{score.title} ({split})" if split and score.shown == "all" else score.title


class SampleQuality(Metric):
    """FID, KID, IS and precision/recall (k-NN, k=3) of generated uint8 images against named real sets; FD-DINOv2
    too with `dinov2` (True, {'enabled': true, 'weights_path': ...} or a FeatureExtractor; default off)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, feature_extractor="digits", k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000,
                 is_splits: int = 10, kid_seed: int = 0, dinov2=None, **kwargs):
        super().__init__(**kwargs)
        self.extractor: FeatureExtractor = make_feature_extractor(feature_extractor)
        self.dinov2: FeatureExtractor | None = make_dinov2(dinov2)  # FD-DINOv2's network, None when off
        self.k, self.kid_subsets, self.kid_subset_size = k, kid_subsets, kid_subset_size
        self.is_splits, self.kid_seed = is_splits, kid_seed
        self.references: dict[str, Reference] = {}
        # (N,) the label each sample number was asked for, set by the caller when the extractor classifies the
        # model's classes: compute() then adds class_accuracy, the share of samples classified as asked
        self.requested_labels: Tensor | None = None
        self.add_state("gen_features", [], dist_reduce_fx="cat")
        self.add_state("gen_logits", [], dist_reduce_fx="cat")
        self.add_state("gen_index", [], dist_reduce_fx="cat")
        self.add_state("gen_dinov2", [], dist_reduce_fx="cat")  # (N, 1024) with FD-DINOv2, else never filled

    def features(self, images: Tensor, extractor: FeatureExtractor | None = None) -> tuple[Tensor, Tensor | None]:
        """One pass of the extractor (default the main one): uint8 (N, C, H, W) -> float64 features (N, D), logits
        (N, K) or None."""
        extractor = extractor or self.extractor
        images = images.to(self.device)
        if len(images) == 0:  # a rank without samples still sends (0, D) features when they are gathered
            features, logits = extractor(images.new_zeros(1, *images.shape[1:]))
            features, logits = features[:0], None if logits is None else logits[:0]
        else:
            features, logits = extractor(images)
        return features.double(), None if logits is None else logits.double()

    def update(self, images: Tensor | None = None, index: Tensor | None = None, *,
               parts: dict[str, Tensor] | None = None) -> None:
        """Add generated uint8 images, `index` (N,) their sample numbers (default: in order of arrival); or `parts`,
        the states `extract` made of some (now, or read back from a shard)."""
        if parts is None:
            if index is None:
                seen = sum(len(i) for i in self.gen_index)
                index = torch.arange(seen, seen + len(images))
            parts = self.extract(images, index)
        for name, value in parts.items():
            getattr(self, name).append(value.to(self.device))

    def extract(self, images: Tensor, index: Tensor) -> dict[str, Tensor]:
        """What the metric keeps of generated uint8 images numbered `index`: {state name: tensor with one row per
        image}, e.g. gen_features (N, D), gen_index (N,), gen_logits (N, K) where the extractor classifies,
        gen_dinov2 (N, 1024) with FD-DINOv2. A part can be saved (evaluate.py's shards) and added later:
        update(images, index) is add(extract(images, index))."""
        features, logits = self.features(images)
        parts = {"gen_features": features, "gen_index": torch.as_tensor(index).to(self.device, torch.int64)}
        if logits is not None:
            parts["gen_logits"] = logits
        if self.dinov2 is not None:
            parts["gen_dinov2"] = self.features(images, self.dinov2)[0]
        return parts

    def add(self, parts: dict[str, Tensor]) -> None:
        """Add the states of `extract` (made now or read back from a shard) to the generated set."""
        self.update(parts=parts)

    def set_reference(self, name: str, images: Tensor, batch_size: int = 256, shard: bool = True) -> None:
        """Features and statistics of a real set, kept across reset(). Under DDP (with shard) every rank must
        call it: each extracts fixed chunks k = rank, rank + W, ... and the chunks are gathered in order."""
        if len(images) <= self.k:
            raise UserError(f"reference {name!r} has {len(images)} images, need more than k={self.k}; "
                            "raise max_reference_images")
        distributed = shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

        def in_order(extractor: FeatureExtractor | None) -> Tensor:
            """(N, D) features of every image, this rank's chunks extracted here, in the images' order."""
            mine = chunk_bounds(len(images), batch_size, rank, world)
            local = [self.features(images[start:stop], extractor)[0] for _, start, stop in mine]
            local = torch.cat(local) if local else self.features(images[:0], extractor)[0]
            gathered = gather_all_tensors(local, self.process_group) if distributed else [local]
            chunks = {}
            for r, part in enumerate(gathered):
                ks = chunk_bounds(len(images), batch_size, r, world)
                chunks.update(zip([k for k, _, _ in ks], part.split([stop - start for _, start, stop in ks]),
                                  strict=True))
            return torch.cat([chunks[k] for k in sorted(chunks)])

        features = in_order(self.extractor)
        dinov2 = None if self.dinov2 is None else in_order(self.dinov2)
        self.references[name] = Reference(features, features.mean(0), torch.cov(features.T),
                                          knn_radii(features, self.k),
                                          None if dinov2 is None else (dinov2.mean(0), torch.cov(dinov2.T)))

    def extraction(self) -> dict:
        """What the generated states depend on besides the images: the extractor, by name and weights."""
        dinov2 = None if self.dinov2 is None else {"name": self.dinov2.name, "sha256": self.dinov2.weights_sha256}
        return {"extractor": self.extractor.name, "extractor_sha256": self.extractor.weights_sha256, "dinov2": dinov2}

    def is_splits_for(self, n: int) -> int:
        """IS splits: is_splits (10, the standard protocol) with at least 100 samples each, else fewer."""
        return max(1, min(self.is_splits, n // 100))

    def settings(self, num_generated: int) -> dict:
        """How the numbers are computed (goes into the protocol)."""
        kid = {"subsets": self.kid_subsets, "max_subset_size": self.kid_subset_size, "degree": 3, "seed": self.kid_seed}
        return {"precision_recall_k": self.k, "kid": kid, "is_splits": self.is_splits_for(num_generated)}

    def compute(self) -> dict[str, float]:
        """Every score of SCORES that applies, in their order: per reference set `<name>_<split>` (fid_train,
        kid_std_val, ...), then those of the samples alone (is, is_std, class_accuracy)."""
        index = dim_zero_cat(self.gen_index)
        order = index.argsort(stable=True)  # sample order, whatever rank made each sample
        features = dim_zero_cat(self.gen_features)[order]  # (M, D) float64
        if len(features) <= self.k:
            raise UserError(f"sample quality needs more than k={self.k} generated samples, got {len(features)}; "
                            "raise num_samples")
        if not self.references:
            raise UserError("sample quality has no reference set; call set_reference(name, images) first")
        logits = dim_zero_cat(self.gen_logits)[order] if _nonempty(self.gen_logits) else None
        asked = None if self.requested_labels is None or logits is None else \
            self.requested_labels.to(features.device)[index[order]]  # (M,) the label each sample was asked for
        dinov2 = None
        if _nonempty(self.gen_dinov2):
            dinov2 = dim_zero_cat(self.gen_dinov2)[order]  # (M, 1024) float64
            dinov2 = (dinov2.mean(0), torch.cov(dinov2.T))
        samples = Samples(features, features.mean(0), torch.cov(features.T), knn_radii(features, self.k), logits,
                          asked, dinov2)
        scores = {}
        for name, ref in self.references.items():
            ref = Reference(*(t.to(features.device) for t in (ref.features, ref.mu, ref.sigma, ref.radii)),
                            None if ref.dinov2 is None else tuple(t.to(features.device) for t in ref.dinov2))
            for score in SCORES:
                if score.per_reference:
                    scores.update({f"{k}_{name}": v for k, v in score.values(self, samples, ref).items()})
        for score in SCORES:
            if not score.per_reference:
                scores.update(score.values(self, samples, None))
        return scores

    def kid(self, real: Tensor, fake: Tensor) -> tuple[float, float]:
        """KID (Binkowski et al. 2018): polynomial-kernel MMD² over random subsets, a fixed generator."""
        m = min(self.kid_subset_size, len(real), len(fake))
        gen = torch.Generator().manual_seed(self.kid_seed)
        values = torch.stack([poly_mmd(real[torch.randperm(len(real), generator=gen)[:m].to(real.device)],
                                       fake[torch.randperm(len(fake), generator=gen)[:m].to(fake.device)])
                              for _ in range(self.kid_subsets)])
        return values.mean().item(), values.std(unbiased=False).item()


def _nonempty(state: list[Tensor] | Tensor) -> bool:
    """A 'cat' state holds data: a non-empty list before sync, a non-empty tensor after."""
    return len(state) > 0 if isinstance(state, list) else state.numel() > 0


def make_protocol(*, num_generated: int, reference_sizes: dict[str, int], extractor: FeatureExtractor,
                  sampler: SamplerSpec, objective: Objective, weights: str, seed: int,
                  settings: dict | None = None, dinov2: FeatureExtractor | None = None,
                  noise_block: int = NOISE_BLOCK) -> dict:
    """Everything a score depends on besides the network: scores with different protocols are not comparable.
    The objective adds what it records (DDPM: num_timesteps and variance, as protocols always held). With FD-DINOv2
    (`dinov2`, its extractor) a `fd_dinov2` entry names its network and weights; without, the protocol is as before.
    The images are 0..num_generated-1 of `seed` (core/sampling/draw.py); their noise block is recorded where it is
    not the default (250, what every protocol held before it could change)."""
    protocol = {
        "num_generated": num_generated,
        "reference": {split: {"num_images": n, "augmentation": "none"} for split, n in reference_sizes.items()},
        "extractor": extractor.name, "extractor_sha256": extractor.weights_sha256[:12],
        "sampler": sampler.describe(objective), **objective.protocol(), "weights": weights, "seed": seed,
        "settings": settings or {},
    }
    if dinov2 is not None:
        protocol["fd_dinov2"] = {"extractor": dinov2.name, "extractor_sha256": dinov2.weights_sha256[:12],
                                 "resize": "224x224 bicubic antialias"}
    if noise_block != NOISE_BLOCK:
        protocol["noise_block"] = noise_block
    return protocol


def protocol_id(protocol: dict) -> str:
    """A short stable hash of the protocol (8 hex digits of sha256 over its sorted JSON)."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:8]


# What a protocol records of the model measured rather than of the measurement: its weights (ema, raw, posthoc-ema
# σ_rel=...) and what `Objective.protocol()` adds (its objective; DDPM's T and variance). A test keeps every
# objective's keys in this list.
MODEL_KEYS = ("weights", "objective", "num_timesteps", "variance")


def measurement_id(protocol: dict) -> str:
    """protocol_id of the protocol less the model's own entries (`MODEL_KEYS`): scores of different models or
    averages (another objective, T, EMA width) measured alike, with the same sampler setting, samples, reference
    and extractor, share it, so a sweep's table compares them in one column."""
    return protocol_id({k: v for k, v in protocol.items() if k not in MODEL_KEYS})


def describe_measurement(protocol: dict) -> str:
    """'1000 samples ddim-50 η=0 vs train 1500/val 297, digits-cnn-v1 sha 0505ec54': how, whatever the weights."""
    refs = "/".join(f"{split} {r['num_images']}" for split, r in protocol["reference"].items())
    return (f"{protocol['num_generated']} samples {sampler_label(protocol['sampler'])} vs {refs}, "
            f"{protocol['extractor']} sha {protocol['extractor_sha256'][:8]}{_dinov2_text(protocol)}")


def _dinov2_text(protocol: dict) -> str:
    """', dinov2-vitl14 sha 1a2b3c4d' where the protocol has FD-DINOv2, else ''."""
    dinov2 = protocol.get("fd_dinov2")
    return f", {dinov2['extractor']} sha {dinov2['extractor_sha256'][:8]}" if dinov2 else ""


def describe(scores: dict[str, float], protocol: dict) -> str:
    """One line: 'val/fid 3.21 · val/is 8.90 ... [protocol ab12cd34: 1000 samples ddim-50 η=0 ema vs ...]'."""
    values = " · ".join(f"{k} {_fmt(v)}" for k, v in scores.items())
    sampler = sampler_label(protocol["sampler"])
    refs = "/".join(f"{split} {r['num_images']}" for split, r in protocol["reference"].items())
    return (f"{values} [protocol {protocol_id(protocol)}: {protocol['num_generated']} samples {sampler} "
            f"{protocol['weights']} vs {refs}, {protocol['extractor']} sha {protocol['extractor_sha256'][:8]}"
            f"{_dinov2_text(protocol)}]")


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"
