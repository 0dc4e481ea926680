"""The train loader: an order and flips drawn from (seed, epoch) alone, and a position Lightning saves.

The train order and the flips are a function of (seed, epoch) alone (`EpochSampler`), and the train loader
tells Lightning how far into the epoch it got (`ResumableLoader`), so a run resumed from a checkpoint taken in
the middle of an epoch sees exactly the batches the uninterrupted run would have seen. `DeviceLoader` draws
the same batches from a copy of the images on the accelerator (data.on_device=true).
"""

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from diffusion.core.images import to_model_range
from diffusion.errors import UserError

# data.on_device=null puts the train split on an accelerator when it takes at most this share of the memory free
# there: the rest is the model's, the optimizer's and the activations'
DEVICE_SHARE = 0.25


def free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device; None where the split would not be copied (CPU: it is in host memory already)
    or where torch does not say (other accelerators)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def split_on_device(on_device: bool | None, nbytes: int, device: torch.device, free: int | None) -> bool:
    """Whether the train split (nbytes of uint8 images) goes on `device` (data.on_device: true, false or null).

    null: on the CPU always (nothing is copied), on a CUDA device when it takes at most DEVICE_SHARE of the `free`
    bytes there, elsewhere not (the DataLoader). true: refused in one line when the split exceeds the free memory."""
    if on_device is False:
        return False
    if on_device is None:
        return device.type == "cpu" or (free is not None and nbytes <= DEVICE_SHARE * free)
    if free is not None and nbytes > free:
        raise UserError(f"data.on_device=true: the train split takes {nbytes / 2**30:.2f} GiB and {device} has "
                        f"{free / 2**30:.2f} GiB free; set data.on_device=false (the DataLoader) or null (on the "
                        "device only when it fits)")
    return True


class _ModelInputs(Dataset):
    """uint8 (C, H, W) images -> float32 in [-1, 1], by index or by (index, flip) as `EpochSampler` draws them;
    with `labels` (N,), each item is (image, its label), so a label travels with its image wherever it goes."""

    def __init__(self, images: Dataset, labels: Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, bool]) -> Tensor:
        index, flip = key if isinstance(key, tuple) else (key, False)
        x = self.images[index]  # (C, H, W) uint8
        x = to_model_range(x.flip(-1) if flip else x)
        return x if self.labels is None else (x, self.labels[index])


class EpochSampler(DistributedSampler):
    """This rank's share of a permutation drawn from (seed, epoch) alone, as (index, flip) pairs.

    The flips (probability 1/2 each, if asked) come from the same draw, so they do not depend on which
    process loads the image or on any global RNG. `start` skips this rank's first draws (a resumed epoch).
    Ranks take every num_replicas-th draw; being a DistributedSampler, Lightning does not wrap it under DDP.
    """

    def __init__(self, dataset: Dataset, seed: int, random_flip: bool, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.random_flip, self.start = random_flip, 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.dataset)
        order, flips = rng.permutation(n), (rng.random(n) < 0.5) & self.random_flip  # (N,), (N,)
        mine = slice(self.rank + self.start * self.num_replicas, self.total_size, self.num_replicas)
        return zip(order[mine].tolist(), flips[mine].tolist(), strict=True)


class ResumableLoader(DataLoader):
    """The train loader: Lightning saves its `state_dict` (epoch, batches served) in every checkpoint and
    loads it on resume (its fit loop does so for any loader with state_dict/load_state_dict), so the resumed
    epoch goes on with the batches the uninterrupted run would have drawn. Its sampler is an `EpochSampler`.

    Batches are counted as they leave the loader, so workers fetching ahead do not shift the position.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._served, self._resuming = 0, 0, False  # the pass under way: its epoch, batches given

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = state["epoch"], state["batches"]
        if served >= len(self):  # saved after the epoch's last batch: the next epoch starts from its beginning
            epoch, served = epoch + 1, 0
        self._epoch, self._served, self._resuming = epoch, served, True
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return self._batches()  # a generator: nothing is drawn before the first batch is asked for

    def _batches(self):
        if self._resuming:  # the restored position wins over the epoch Lightning set meanwhile
            self.sampler.set_epoch(self._epoch)
        else:
            self._epoch, self._served = self.sampler.epoch, 0
        self._resuming = False
        self.sampler.start = self._served * self.batch_size
        for batch in super().__iter__():
            self._served += 1
            yield batch
        self.sampler.set_epoch(self._epoch + 1)  # a whole pass (outside Lightning, which sets it): a new order



class DeviceLoader:
    """The train loader of `data.on_device=true`: the uint8 split copied to the device once, each batch gathered
    and flipped there (no DataLoader, no workers). Order and flips are `EpochSampler`'s, position and resume are
    `ResumableLoader`'s, so a seed gives the same batches, bit for bit, on either path. With `labels` (N,) (a
    class-conditional run), batches are (images, labels), as the DataLoader's are."""

    def __init__(self, images: Tensor, sampler: EpochSampler, batch_size: int, device, labels: Tensor | None = None):
        self.images, self.sampler, self.batch_size, self.device = images, sampler, batch_size, device
        self.labels = labels
        self._on_device: Tensor | None = None
        self._labels_on_device: Tensor | None = None
        self._epoch, self._served, self._resuming = 0, 0, False

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # the last partial batch is dropped

    state_dict = ResumableLoader.state_dict
    load_state_dict = ResumableLoader.load_state_dict

    def __iter__(self):
        return self._batches()

    def _batches(self):
        if self._on_device is None:
            self._on_device = self.images.to(self.device)  # (N, C, H, W) uint8, once
            if self.labels is not None:
                self._labels_on_device = self.labels.long().to(self.device)  # (N,)
        if self._resuming:
            self.sampler.set_epoch(self._epoch)
        else:
            self._epoch, self._served = self.sampler.epoch, 0
        self._resuming = False
        self.sampler.start = self._served * self.batch_size
        pairs = list(self.sampler)  # this rank's (index, flip) draws from the resumed position on
        index = torch.tensor([i for i, _ in pairs], dtype=torch.long).to(self.device, non_blocking=True)
        flips = torch.tensor([f for _, f in pairs], dtype=torch.bool).to(self.device, non_blocking=True)
        for start in range(0, len(pairs) - self.batch_size + 1, self.batch_size):
            rows = slice(start, start + self.batch_size)
            x = self._on_device[index[rows]]  # (B, C, H, W) uint8
            x = torch.where(flips[rows].view(-1, 1, 1, 1), x.flip(-1), x)
            self._served += 1
            if self._labels_on_device is None:
                yield to_model_range(x)
            else:
                yield to_model_range(x), self._labels_on_device[index[rows]]
        self.sampler.set_epoch(self._epoch + 1)
