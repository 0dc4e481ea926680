"""Feature extractors for sample-quality metrics: uint8 images (N, C, H, W) -> (features (N, D), logits or None).

Each extractor has a `name`, `num_features`, and `weights_sha256` (over its state_dict), so that a score can
say exactly which network made it. `DigitsFeatures` is a small CNN trained once on the digits train split
and cached; `InceptionFeatures` is the standard FID/IS network (torch-fidelity's port of the 2015 TF graph);
`DINOv2Features` is DINOv2 ViT-L/14, FD-DINOv2's network (Stein et al. 2023); `ModuleFeatures` wraps any user module.
"""

import hashlib
import importlib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.core.images import to_model_range
from diffusion.data import load_digits_split
from diffusion.errors import UserError
from diffusion.files import probe_writable

DIGITS_CNN_VERSION = "v1"  # bump when the architecture or the training recipe changes: a new cache file
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name in the torch hub cache
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"  # the official torch.hub checkpoint's name (torch hub cache)
DINOV2_URL = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/{DINOV2_FILE}"
DINOV2_OPTION = "callbacks.quality.fd_dinov2.weights_path"  # train.py's key; evaluate.py's is fd_dinov2.weights_path


def state_sha256(module: nn.Module) -> str:
    """sha256 over the module's state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/diffusion, or ~/.cache/diffusion."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion"


class FeatureExtractor(nn.Module):
    """Base: forward(uint8 (N, C, H, W)) -> (float features (N, D), logits (N, K) or None); never trains."""

    name: str = "features"
    num_features: int | None = None
    class_names: tuple[str, ...] | None = None  # what its logits classify, when they are a data set's classes

    def __init__(self):
        super().__init__()
        self.weights_sha256 = ""

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # always in eval mode, whatever the caller's module does

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise UserError(f"{self.name} takes uint8 images (N, C, H, W), got {images.dtype} of shape "
                            f"{tuple(images.shape)}; convert with ((x + 1) * 127.5).round().to(torch.uint8)")
        with torch.no_grad():
            return self.extract(images)

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class ModuleFeatures(FeatureExtractor):
    """Any module mapping uint8 images to features, or to (features, logits)."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__()
        self.module, self.name = module.eval().requires_grad_(False), name
        self.weights_sha256 = state_sha256(module)

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.module(images)
        features, logits = out if isinstance(out, tuple | list) else (out, None)
        self.num_features = features.shape[1]
        return features.flatten(1), logits


# --- digits: a small CNN trained on the train split ------------------------------------------------------
class DigitsCNN(nn.Module):
    """1x8x8 digit in [-1, 1] -> (64-d features before the last ReLU, 10 logits).

    The features are divided by `feature_scale`, their RMS over the train split, so that they are O(1) like
    Inception's and KID's cubic kernel (x.y / D + 1)^3 stays in a sensible range.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 2, 2)
            nn.Flatten(), nn.Linear(256, 64))  # (B, 64): the features
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))
        self.register_buffer("feature_scale", torch.tensor(1.0))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)  # (B, 64)
        return h / self.feature_scale, self.head(h)


def _shifted(x: Tensor) -> Tensor:
    """Every translation by -1, 0, +1 pixel in each direction, background filled: (9, N, C, H, W)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    H, W = x.shape[-2:]
    return torch.stack([padded[..., i:i + H, j:j + W] for i in range(3) for j in range(3)])


def train_digits_cnn(seed: int = 0, epochs: int = 20, batch_size: int = 64) -> tuple[DigitsCNN, float]:
    """Train on the digits train split (Adam, 1-pixel shifts); return the net and its val-split accuracy."""
    images, labels = load_digits_split("train")
    shifted = _shifted(to_model_range(images))  # (9, N, 1, 8, 8)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = len(labels)
    for _ in range(epochs):
        order, shift = torch.randperm(n, generator=gen), torch.randint(9, (n,), generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(shifted[shift[idx], idx])[1], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    val_images, val_labels = load_digits_split("val")
    with torch.no_grad():
        net.feature_scale.copy_(net.body(to_model_range(images)).square().mean().sqrt())
        accuracy = (net(to_model_range(val_images))[1].argmax(1) == val_labels).double().mean().item()
    return net, accuracy


class DigitsFeatures(FeatureExtractor):
    """`DigitsCNN` trained on the digits train split at first use (~5 s), then loaded from the cache.

    The val split stays held out: its accuracy (`val_accuracy`, ~98%) is stored with the weights. Training is
    seeded and single-threaded, so it is reproducible on one machine; `weights_sha256` names the result.
    """

    num_features = 64
    class_names = tuple(str(k) for k in range(10))  # its logits are the digits' classes

    def __init__(self, cache_dir: str | Path | None = None):
        super().__init__()
        self.name = f"digits-cnn-{DIGITS_CNN_VERSION}"
        self.cache_path = Path(cache_dir or default_cache_dir()).expanduser() / f"{self.name}.pt"
        self.trained_now = not self.cache_path.is_file()
        if self.trained_now:
            _check_writable(self.cache_path.parent)  # before training it, not after
        state = _train_and_cache(self.cache_path) if self.trained_now else _load_cache(self.cache_path)
        self.net = DigitsCNN()
        self.net.load_state_dict(state["state_dict"])
        self.net.eval().requires_grad_(False)
        self.val_accuracy = float(state["val_accuracy"])
        self.weights_sha256 = state_sha256(self.net)

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise UserError(f"{self.name} takes 1x8x8 digits, got images of shape {tuple(images.shape[1:])}; "
                            "use callbacks.quality.feature_extractor.name=inception for other data")
        return self.net(to_model_range(images))


def _check_writable(folder: Path) -> None:
    """The cache folder can take the trained classifier (created if needed; a probe file written and removed)."""
    try:
        probe_writable(folder)
    except OSError as err:
        raise UserError(f"the digits classifier cannot be cached in {folder} ({err.strerror or err}); set "
                        "callbacks.quality.feature_extractor.cache_dir=<a writable folder> (or XDG_CACHE_HOME)"
                        ) from err


def _train_and_cache(path: Path) -> dict:
    """Train the digits CNN on one thread (reproducible, and fast on a busy CPU); write it atomically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, accuracy = train_digits_cnn()
    finally:
        torch.set_num_threads(threads)
    state = {"version": DIGITS_CNN_VERSION, "state_dict": net.state_dict(), "val_accuracy": accuracy}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)  # other processes see the old file or the whole new one, never half of it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state


def _load_cache(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cached digits classifier {path} is unreadable ({type(err).__name__}: {err}); "
                        "delete it and it is trained again") from err
    if not isinstance(state, dict) or state.get("version") != DIGITS_CNN_VERSION:
        raise UserError(f"cached digits classifier {path} is not version {DIGITS_CNN_VERSION}; "
                        "delete it and it is trained again")
    return state


class InceptionFeatures(FeatureExtractor):
    """InceptionV3 as torchmetrics uses it for FID/IS: 2048-d pool features and 1008 unbiased logits.

    Images are resized to 299x299 (bilinear, antialiased, as torchmetrics' default); grey ones repeated to
    RGB. Without `weights_path`, the weights are read from the torch hub cache, where torch-fidelity puts
    them; nothing is downloaded.
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.name = "inception-v3-compat"
        path = Path(weights_path).expanduser() if weights_path else inception_weights_path()
        if not path.is_file():
            raise UserError(missing_weights("Inception", path, weights_path is not None, INCEPTION_FILE, INCEPTION_URL,
                                            f"callbacks.quality.feature_extractor.weights_path=/path/to/{INCEPTION_FILE}"))
        try:
            self.net = NoTrainInceptionV3(self.name, ["2048", "logits_unbiased"], str(path))
        except Exception as err:
            raise UserError(f"cannot load Inception weights {path} ({type(err).__name__}); fetch {INCEPTION_URL} "
                            "again") from err
        self.weights_sha256 = state_sha256(self.net)

    def extract(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grey -> RGB
        features, logits = self.net._torch_fidelity_forward(images)  # (N, 2048), (N, 1008)
        return features, logits


def hub_checkpoint(file: str) -> Path:
    """Where torch.hub (and torch-fidelity) keep a downloaded checkpoint: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file


def inception_weights_path() -> Path:
    return hub_checkpoint(INCEPTION_FILE)


def missing_weights(network: str, path: Path, given: bool, file: str, url: str, option: str, off: str = "") -> str:
    """The one line for a weights file that is not there: the file, where to fetch it and the option that names it."""
    if given:
        return f"{network} weights {path} not found; fetch {url} and set {option}"
    return (f"{network} weights not found: put {file} in {path.parent}/ (fetch it from {url} on a machine with "
            f"internet), or set {option}{off}")


class DINOv2Features(FeatureExtractor):
    """DINOv2 ViT-L/14 (Oquab et al. 2023) as FD-DINOv2 uses it (Stein et al. 2023, dgm-eval; EDM2 reports it
    beside FID): the CLS token after the final norm, 1024-d; no logits.

    The architecture is timm's `vit_large_patch14_dinov2` (no download: pretrained=False), built for 224x224 input;
    the weights come from a local file: the official torch.hub checkpoint `dinov2_vitl14_pretrain.pth` (converted
    by timm's checkpoint filter) or the same network's timm state dict (.pth, or .safetensors as timm's hub
    copy). Without `weights_path` the file is read from <torch hub>/checkpoints/, where torch.hub would put it.

    Preprocessing follows EDM2's DINOv2 detector (`calculate_metrics.py`, its default resize_mode='torch', which
    its authors note matches dgm-eval's PIL resize closely): grey repeated to RGB, a bicubic antialiased resize of
    the 0-255 values to 224x224 in float32 (not re-quantized to uint8), /255, ImageNet mean/std normalisation.
    The checkpoint's 37x37 position embedding is resampled to 16x16 once, exactly as the official model does at
    every 224x224 forward (bicubic, scale factor (16 + 0.1) / 37, no antialias), so the features are those of
    torch.hub's `dinov2_vitl14` that dgm-eval and EDM2 run, not timm's own (antialiased) resampling.
    """

    num_features = 1024
    size = 224  # dgm-eval's and EDM2's input size
    patch = 14
    chunk = 128  # images per forward pass (bounds the attention's memory whatever batch the caller passes)

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        self.name = "dinov2-vitl14"
        path = Path(weights_path).expanduser() if weights_path else dinov2_weights_path()
        if not path.is_file():
            raise UserError(missing_weights(
                "DINOv2", path, weights_path is not None, DINOV2_FILE, DINOV2_URL,
                f"{DINOV2_OPTION}=/path/to/{DINOV2_FILE} (evaluate.py: fd_dinov2.weights_path=...)",
                off="; or turn FD-DINOv2 off with fd_dinov2.enabled=false"))
        self.net = _load_dinov2(path)
        self.weights_sha256 = state_sha256(self.net)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def extract(self, images: Tensor) -> tuple[Tensor, None]:
        if images.shape[1] not in (1, 3):
            raise UserError(f"{self.name} takes grey or RGB images, got {images.shape[1]} channels")
        return torch.cat([self._cls(part) for part in images.split(self.chunk)]), None

    def _cls(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32).expand(-1, 3, -1, -1)  # grey -> RGB (RGB unchanged)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.net.forward_features(x)[:, 0]  # the CLS token after the final norm


def dinov2_weights_path() -> Path:
    return hub_checkpoint(DINOV2_FILE)


def _load_dinov2(path: Path) -> nn.Module:
    """timm's ViT-L/14 (DINOv2) at 224x224 with the file's weights, every tensor of the network from the file."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    unreadable = f"cannot load DINOv2 weights {path}"
    fix = f"fetch {DINOV2_URL} again (or give its timm state dict as {DINOV2_OPTION})"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{unreadable} ({type(err).__name__}); {fix}") from err
    with torch.device("meta"):  # no random init of 300M parameters: every one is assigned from the file
        net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, num_classes=0,
                                img_size=DINOv2Features.size)
    try:
        state = dict(state.get("model", state.get("state_dict", state)))
        state["pos_embed"] = _official_pos_embed(state["pos_embed"], DINOv2Features.size // DINOv2Features.patch)
        net.load_state_dict(checkpoint_filter_fn(state, net), strict=True, assign=True)
    except Exception as err:
        raise UserError(f"{unreadable}: not DINOv2 ViT-L/14 ({type(err).__name__}: {str(err)[:200]!r}); {fix}"
                        ) from err
    return net.float().eval().requires_grad_(False)


def _official_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) as DINOv2's `interpolate_pos_encoding` computes it (the torch.hub
    models: interpolate_offset 0.1, interpolate_antialias False), so timm at a fixed size gives its features."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    if m == grid:
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    scale = (grid + 0.1) / m
    patches = nn.functional.interpolate(patches.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                                        mode="bicubic", antialias=False)
    if tuple(patches.shape[-2:]) != (grid, grid):
        raise ValueError(f"position embedding of {m}x{m} patches resampled to {tuple(patches.shape[-2:])}")
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)], dim=1)


def make_dinov2(spec) -> "DINOv2Features | FeatureExtractor | None":
    """FD-DINOv2's extractor from fd_dinov2's settings: None or {'enabled': false} -> None (off); True or
    {'enabled': true, 'weights_path': ...} -> DINOv2Features; a FeatureExtractor as it is."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if spec is None or spec is False:
        return None
    options = {} if spec is True else dict(spec)
    if not options.pop("enabled", True):
        return None
    unknown = set(options) - {"weights_path"}
    if unknown:
        raise UserError(f"fd_dinov2 takes enabled and weights_path, got {sorted(unknown)}; remove the others")
    return DINOv2Features(options.get("weights_path"))


def make_feature_extractor(spec) -> FeatureExtractor:
    """'digits' | 'inception' | {'name', 'weights_path', 'cache_dir'} | an nn.Module -> a FeatureExtractor."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if isinstance(spec, nn.Module):
        return ModuleFeatures(spec, type(spec).__name__)
    options = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = options.pop("name", None)
    allowed = {"digits": {"cache_dir"}, "inception": {"weights_path"}, "module": {"target"}}
    if name not in allowed:
        raise UserError(f"feature_extractor must be 'digits', 'inception', 'module' or an nn.Module, got {name!r}; "
                        "try callbacks.quality.feature_extractor.name=digits")
    options = {k: v for k, v in options.items() if v is not None}
    if set(options) - allowed[name]:
        raise UserError(f"feature_extractor {name} takes {sorted(allowed[name])}, got {sorted(options)}; "
                        "remove the others")
    if name == "module":
        return ModuleFeatures(_import_module_class(options.get("target")), options.get("target"))
    return DigitsFeatures(**options) if name == "digits" else InceptionFeatures(**options)


def _import_module_class(target: str | None) -> nn.Module:
    """`package.module.Class` (built with no arguments) -> the nn.Module that maps uint8 images to features."""
    fix = "give feature_extractor.target=package.module.Class, an nn.Module mapping uint8 images to features"
    if not target:
        raise UserError(f"feature_extractor name=module needs a target, got {target!r}; {fix}")
    module_name, _, attr = target.rpartition(".")
    try:
        made = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"feature_extractor.target {target} cannot be imported ({err}); {fix}") from err
    if not isinstance(made, nn.Module):
        raise UserError(f"feature_extractor.target {target} built a {type(made).__name__}, not an nn.Module; {fix}")
    return made
