"""sample(cfg): images from a checkpoint alone, as a PNG grid and an .npz of uint8 images."""

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffusion.core.images import to_uint8
from diffusion.core.sampling import SamplerSpec, check_guidance, check_index, draw, resolve_labels
from diffusion.files import written_whole
from diffusion.formats.png import save_grid
from diffusion.lightning.checkpoints import load_weights
from diffusion.rules import parse_numbers
from diffusion.run.jobs.console import quiet_console
from diffusion.run.jobs.preflight import check_device, writable_dir


def sample(cfg: DictConfig) -> Path:
    """Sample a checkpoint: samples.png (the first 256) and samples.npz (uint8 NHWC `samples`, their image numbers
    `index`, and the `labels` asked for, if any) in the output directory."""
    quiet_console()
    device = check_device(cfg.device)
    out = writable_dir(cfg.output_dir, "output_dir")  # before the work, not after it
    index = None if cfg.seeds is None else check_index(parse_numbers(cfg.seeds), cfg.num_samples)
    module, _, _ = load_weights(cfg.ckpt, cfg.weights, cfg.ema.sigma_rel, cfg.ema.snapshot_dir, device)
    spec = SamplerSpec(**OmegaConf.to_container(cfg.sampler, resolve=True)).check_for(module.objective)
    check_guidance(spec.guidance_scale, module.num_classes, cond_drop_prob=module.cond_drop_prob)
    labels = resolve_labels(OmegaConf.to_container(cfg, resolve=True).get("labels"), cfg.num_samples,
                            module.num_classes, module.class_names)
    drawn = draw(module.net, module.objective, spec, cfg.num_samples, shape=module.net.image_shape, seed=cfg.seed,
                 chunk_size=cfg.batch_size, index=index, noise_block=cfg.noise_block, device=device, labels=labels)
    uint8 = to_uint8(drawn.images).cpu()  # (N, C, H, W)
    arrays = {"samples": uint8.permute(0, 2, 3, 1).numpy(), "index": drawn.index.numpy()}
    if labels is not None:  # the label each image was asked for
        arrays["labels"] = labels[drawn.index].numpy()
    with written_whole(out / "samples.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    grid_path = save_grid(drawn.images[:256], out / "samples.png")
    print(f"samples: {grid_path} and {out / 'samples.npz'}")
    return grid_path
