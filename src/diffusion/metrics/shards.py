"""Feature shards: what a sample-quality metric keeps of each drawn chunk, on disk as the evaluation goes.

An evaluation of 50,000 samples at 1,000 steps is hours of GPU time; a preempted one should lose one chunk, not
all of them. `FeatureShards` keeps, for one draw (one model, sampler, seed, noise block and sample count, one
feature extractor), a folder `<root>/<key>/` with a `manifest.json` that says what the draw is and one file per
chunk: the chunk's `SampleQuality.extract` states (features, image numbers, logits ...) and, if asked, its uint8
images, each written whole or not at all. `load` reads back what is there: the image numbers it covers and their
states, which the metric adds instead of drawing them again. Images are numbered and seeded per image
(core/sampling/draw.py), so shards made by any batch size, device count or job (the tasks of a SLURM array, each
drawing a range of image numbers into the same folder) merge into the one-shot set; an image found in two shards
counts once.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffusion.errors import UserError
from diffusion.files import write_file, written_whole

INDEX = "gen_index"  # the state that holds the image numbers (SampleQuality.extract)


def draw_key(descriptor: dict) -> str:
    """12 hex digits of sha256 over the descriptor's sorted JSON: the folder of one draw's shards."""
    return hashlib.sha256(json.dumps(descriptor, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tensor_sha256(tensor: Tensor | None) -> str | None:
    """sha256 of a tensor's bytes (labels asked for, in a draw's descriptor), None for None."""
    if tensor is None:
        return None
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Loaded:
    """What a draw's folder holds: the image numbers covered (sorted, each once) and their states, shard by shard
    (rows of an image already seen in an earlier shard dropped)."""

    index: Tensor  # (n,) int64
    parts: list[dict[str, Tensor]]


class FeatureShards:
    """One draw's shards under `root` (see the module docstring)."""

    def __init__(self, root: str | Path, descriptor: dict, keep_images: bool = False):
        self.root, self.descriptor, self.keep_images = Path(root), descriptor, keep_images
        self.dir = self.root / draw_key(descriptor)

    def prepare(self) -> None:
        """The draw's folder and its manifest (written once; a folder whose manifest says another draw is refused)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"shards.dir={self.root}: cannot create {self.dir} ({err.strerror}); give a writable "
                            "folder") from err
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            if json.loads(manifest.read_text()) != json.loads(json.dumps(self.descriptor, default=str)):
                raise UserError(f"shards.dir={self.root}: {manifest} describes another draw than this one; give an "
                                "empty folder, or remove that one")
        else:
            write_file(manifest, json.dumps(self.descriptor, indent=2, sort_keys=True, default=str))

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("chunk-*.pt")) if self.dir.is_dir() else []

    def load(self, with_states: bool = True) -> Loaded:
        """The image numbers the shards cover and (with_states) their states, on the CPU."""
        seen: set[int] = set()
        parts = []
        for path in self.files():
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 (a shard is written whole; anything unreadable is named)
                raise UserError(f"shard {path} cannot be read ({type(err).__name__}); delete it and run again, which "
                                "draws its images again") from err
            part.pop("images", None)
            new = torch.tensor([int(i) not in seen for i in part[INDEX].tolist()], dtype=torch.bool)
            seen.update(part[INDEX].tolist())
            if with_states and bool(new.any()):
                parts.append({name: value[new] for name, value in part.items()})
        return Loaded(torch.tensor(sorted(seen), dtype=torch.int64), parts)

    def save(self, k: int, parts: dict[str, Tensor], images: Tensor | None = None) -> Path:
        """Chunk k's states (and uint8 images, when kept), whole or absent, named by chunk and image numbers."""
        index = parts[INDEX].cpu()
        name = f"chunk-{k:07d}-{int(index[0]):08d}-{int(index[-1]):08d}-{tensor_sha256(index)[:8]}.pt"
        record = {key: value.detach().cpu() for key, value in parts.items()}
        if self.keep_images and images is not None:
            record["images"] = images.detach().cpu()
        with written_whole(self.dir / name) as tmp:
            torch.save(record, tmp)
        return self.dir / name
