"""Classifier-free guidance (Ho & Salimans 2022) over a class-conditional `net(x_t, t, y)`, and sample labels.

Convention: ε̂ = ε_u + w (ε_c − ε_u), with ε_c = net(x_t, t, y) and ε_u = net(x_t, t, "no label"): w = 1 is
the plain conditional model, w = 0 the unconditional one, w > 1 pushes samples towards their label. The same
combination is applied to the network's output in every parameterization: x0, v and the posterior mean are
affine in ε at a given x_t, with coefficients that sum to one across the two passes, so guiding them is
guiding ε. A learned variance (the output's second half) is taken from the conditional pass (GLIDE's
choice). Both passes run as one batched forward of 2B images.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffusion.errors import UserError


def guide(out_u: Tensor, out_c: Tensor, scale: float, channels: int) -> Tensor:
    """out_u + w (out_c − out_u) on the first `channels` (the prediction), out_c's on the rest (a learned
    variance). torch.lerp is exact at both ends: w = 0 gives out_u, w = 1 out_c, bit for bit."""
    guided = torch.lerp(out_u[:, :channels], out_c[:, :channels], scale)  # (B, C, H, W)
    return torch.cat([guided, out_c[:, channels:]], dim=1) if out_c.shape[1] > channels else guided


class GuidedModel:
    """`model(x_t, t)` of a class-conditional net for fixed labels y (B,) and guidance scale w: what every
    sampler calls. w = 1 (or a null scale) runs the conditional pass alone, w = 0 the unconditional one; any
    other w runs both in one forward of [x_t; x_t] with labels [y; no label]."""

    def __init__(self, net: nn.Module, labels: Tensor, scale: float | None):
        self.net, self.labels, self.scale = net, labels, 1.0 if scale is None else float(scale)
        self.null = torch.full_like(labels, net.null_label)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.net(x_t, t, self.labels)
        if self.scale == 0.0:
            return self.net(x_t, t, self.null)
        out = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.labels, self.null]))  # (2B, ...)
        out_c, out_u = out.chunk(2)
        return guide(out_u, out_c, self.scale, x_t.shape[1])


def num_classes_of(net) -> int | None:
    """The label count of a class-conditional net (None: unconditional, or any plain model callable)."""
    return getattr(net, "num_classes", None)


def balanced_labels(num_samples: int, num_classes: int) -> Tensor:
    """int64 (N,): class k for samples k·N/K .. (k+1)·N/K − 1, the same count per class (±1), classes in order,
    so a grid of K rows of N/K images has one class per row."""
    return torch.arange(num_samples) * num_classes // num_samples


def class_rows(num_samples: int, num_classes: int | None) -> tuple[Tensor | None, int | None]:
    """(labels, images per row) of a grid with one row per class, about num_samples images in all (at least
    one per class); (None, None) for an unconditional model (the grid's own default shape)."""
    if num_classes is None:
        return None, None
    per_class = max(1, num_samples // num_classes)
    return balanced_labels(per_class * num_classes, num_classes), per_class


def resolve_labels(value, num_samples: int, num_classes: int | None, class_names: Sequence[str] | None = None,
                   key: str = "labels") -> Tensor | None:
    """The requested labels of N samples as int64 (N,), or None for an unconditional model.

    `value`: None or "balanced" (the same count per class), or a list of class indices or class names,
    repeated in turn to fill the N samples. Raises a one-line UserError for labels the model cannot take.
    """
    if num_classes is None:
        if value is not None:
            raise UserError(f"{key}={_shown(value)} asks for labels, but the checkpoint is unconditional (trained "
                            f"without model.num_classes); drop {key}, or train with model.num_classes=N")
        return None
    if value is None or value == "balanced":
        return balanced_labels(num_samples, num_classes)
    if isinstance(value, str | int) or not isinstance(value, Sequence) or len(value) == 0:
        raise UserError(f"{key}={_shown(value)} is not a list of labels; write {key}=[3,3,7] (class indices "
                        f"or names) or {key}=balanced")
    if len(value) > num_samples:
        raise UserError(f"{key} lists {len(value)} labels for num_samples={num_samples}; set "
                        f"num_samples={len(value)}")
    index = [_label_index(v, num_classes, class_names, key) for v in value]
    return torch.tensor(index, dtype=torch.long).repeat(-(-num_samples // len(index)))[:num_samples]


def _label_index(value, num_classes: int, class_names: Sequence[str] | None, key: str) -> int:
    """One label: an index in [0, K) or a class name (its index in class_names)."""
    names = list(class_names or [])
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_classes:
            raise UserError(f"{key} holds {value}, outside the model's classes [0, {num_classes - 1}]; "
                            f"use labels in 0..{num_classes - 1}")
        return value
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return _label_index(int(value), num_classes, class_names, key)
    known = f"one of {names}" if names else f"an index in 0..{num_classes - 1} (this checkpoint names no classes)"
    raise UserError(f"{key} holds {value!r}, which is not a class of the model; use {known}")


def check_guidance(scale: float | None, num_classes: int | None) -> None:
    """A guidance scale needs a class-conditional model: a one-line UserError otherwise."""
    if scale is not None and num_classes is None:
        raise UserError(f"sampler.guidance_scale={scale:g} guides a class-conditional model, but the checkpoint is "
                        "unconditional (trained without model.num_classes); drop sampler.guidance_scale")


def _shown(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list | tuple) else str(value)
