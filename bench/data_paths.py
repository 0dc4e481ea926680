"""Images/s of each data path beside the training step's, so a user sees whether the data keeps up.

The same images (random 32×32 RGB, written as PNG files) are read three ways: decoded from an image folder
(data=image_folder, the DataLoader), streamed from LitData shards (prepare.py's, data=streaming), and gathered
from a uint8 copy on the training device (data.on_device=true); then the CIFAR-10 U-Net's training step (forward,
backward, Adam) on the same device and batch. A data path slower than the step starves it.

    .venv/bin/python bench/data_paths.py [--images 512] [--batch 32] [--workers 0 2] [--steps 2]

Results go to bench/results/<machine>.json under "data-paths-b<batch>".
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.compose_cfg: train.py's config
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusion.config.build import net_kwargs  # noqa: E402
from diffusion.data import ImageFolderDataModule, StreamingDataModule, write_shards  # noqa: E402
from diffusion.data.loader import DeviceLoader, EpochSampler  # noqa: E402
from diffusion.nn import UNet  # noqa: E402
from helpers import compose_cfg  # noqa: E402
from unet_throughput import machine_name, save  # noqa: E402


def images_per_second(loader, device: torch.device) -> float:
    """One pass over the loader (its first batch, which starts workers, not timed), each batch on `device`."""
    batches = iter(loader)
    first = next(batches)
    n, start = 0, time.perf_counter()
    for x in batches:
        x = x.to(device)
        n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del first
    return n / (time.perf_counter() - start)


def step_images_per_second(device: torch.device, batch: int, steps: int, tmp: Path) -> float:
    """The CIFAR-10 U-Net's training step (DDPM's loss, Adam), median of `steps` after one warm-up; on a CPU at
    batch 4 at most (the images/s barely depend on it there, and a step of 32 takes seconds)."""
    batch = min(batch, 4) if device.type == "cpu" else batch
    cfg = compose_cfg("train", ["experiment=cifar10_ddpm"], tmp)
    net = UNet(**net_kwargs(cfg)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x = torch.randn(batch, 3, 32, 32, device=device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(x)
        loss = F.mse_loss(net(x + eps, t), eps)  # the timing, not the math, matters here
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "folder"
        folder.mkdir()
        for i in range(args.images):  # smooth-ish images, so PNG decodes as it does for photos, not noise
            x = np.cumsum(rng.integers(-8, 9, (32, 32, 3)), axis=1).clip(0, 255).astype(np.uint8)
            Image.fromarray(x).save(folder / f"{i:05d}.png")
        for workers in args.workers:
            kw = {"batch_size": args.batch, "num_workers": workers, "seed": 0, "random_flip": True}
            images = ImageFolderDataModule(root=str(folder), download=False, image_size=32, channels=3,
                                           val_fraction=0.05, max_image_pixels=None, **kw)
            images.setup()
            rows[f"image folder (PNG decode), {workers} workers"] = images_per_second(images.train_dataloader(),
                                                                                      device)
            shards = tmp / "shards"
            if not shards.exists():
                write_shards(images, shards, "64MB", 1)
            streamed = StreamingDataModule(input_dir=str(shards), channels=3, image_size=32, **kw)
            streamed.setup()
            rows[f"streaming (LitData shards), {workers} workers"] = images_per_second(streamed.train_dataloader(),
                                                                                       device)
        train = images._split("train")
        uint8 = torch.stack([train[i] for i in range(len(train))])  # (N, 3, 32, 32)
        sampler = EpochSampler(uint8, 0, True)
        rows[f"on device ({device.type}), no workers"] = images_per_second(
            DeviceLoader(uint8, sampler, args.batch, device), device)
        rows[f"training step, CIFAR-10 U-Net (35.7M), {device.type}"] = step_images_per_second(
            device, args.batch, args.steps, tmp)
    width = max(map(len, rows))
    print(f"images/s at batch {args.batch} ({args.images} images of 3×32×32, {torch.get_num_threads()} threads):")
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:>10,.0f}")
    save(machine_name(device), f"data-paths-b{args.batch}", {"images_per_second": rows, "images": args.images,
                                                               "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
