"""Read and write Hugging Face diffusers folders (a UNet2DModel and a scheduler), without diffusers.

Import maps a folder's UNet2DModel to our U-Net's keyword arguments and weights (`formats.diffusers_unet`), and its
scheduler config to an objective spec (`formats.diffusers_schedulers`: DDPM, EDM or flow matching). Export writes a
folder that diffusers loads, the pipeline named in model_index.json being the one that samples it. Whatever our U-Net
or objectives cannot reproduce is refused with a one-line UserError naming the field.
"""

import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from diffusion.errors import UserError
from diffusion.files import written_whole
from diffusion.formats.diffusers_schedulers import (
    PIPELINES,
    learned_variance_of,
    objective_from_scheduler,
    scheduler_of,
)
from diffusion.formats.diffusers_unet import (
    DIFFUSERS_VERSION,
    check_state_dict,
    from_diffusers_state_dict,
    refuse,
    to_diffusers_state_dict,
    unet_config_from_kwargs,
    unet_kwargs_from_config,
)

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# --- folders ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it from the original folder") from err
    if not isinstance(content, dict):
        raise UserError(f"{path} holds a {type(content).__name__}, not a JSON object; restore it from the original")
    return content


def _find(folder: Path, sub: str, name: str) -> Path:
    """folder/name, else folder/sub/name (the layout DDPMPipeline.save_pretrained writes)."""
    for path in (folder / name, folder / sub / name):
        if path.is_file():
            return path
    raise UserError(f"no {name} in {folder} or {folder / sub}; point at a diffusers folder with a UNet2DModel and "
                    f"a DDPM or DDIM scheduler")


def _load_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The UNet's weights from diffusion_pytorch_model.safetensors or .bin, on the CPU."""
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".bin"):
            return torch.load(path, map_location="cpu", weights_only=True), path
        return safetensors.torch.load_file(path, device="cpu"), path
    raise UserError(f"no {' or '.join(WEIGHTS)} in {folder} (sharded or variant weights are not read); "
                    f"save the UNet again with save_pretrained and no max_shard_size or variant")


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor], dict, dict]:
    """(unet_kwargs, state_dict, objective spec, info) of a local diffusers folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"diffusers folder {folder} does not exist; give a local folder written by save_pretrained")
    index_file = folder / "model_index.json"
    index = _read_json(index_file) if index_file.is_file() else {}
    other = sorted(k for k in index if not k.startswith("_") and k not in ("unet", "scheduler"))
    if other:
        raise refuse(index_file, other[0], index[other[0]], "only a UNet and a scheduler make a pixel-space DDPM "
                     "(no VAE, text encoder, ...)")
    unet_file = _find(folder, "unet", "config.json")
    scheduler_file = _find(folder, "scheduler", "scheduler_config.json")
    unet_kwargs, learned_variance = unet_kwargs_from_config(_read_json(unet_file), unet_file)
    objective, info = objective_from_scheduler(_read_json(scheduler_file), learned_variance, scheduler_file)
    weights, weights_file = _load_weights(unet_file.parent)
    state_dict = from_diffusers_state_dict(weights, unet_kwargs, learned_variance, weights_file)
    info.update(unet_config=str(unet_file), scheduler_config=str(scheduler_file), weights=str(weights_file))
    return unet_kwargs, state_dict, objective, info


def write_diffusers_folder(out_dir: str | os.PathLike, unet_kwargs: dict, state_dict: dict[str, Tensor],
                           objective: dict, card_markdown: str, *, clip_sample: bool = True) -> Path:
    """Write a diffusers folder (model_index.json, unet/, scheduler/, README.md); refuse what diffusers lacks."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export folder {out} already exists and is not empty; choose a new folder or remove it")
    learned = learned_variance_of(objective)
    scheduler = scheduler_of(objective, clip_sample)
    unet = unet_config_from_kwargs(unet_kwargs, learned)
    check_state_dict(state_dict, unet_kwargs, learned)
    weights = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, v in to_diffusers_state_dict(state_dict, len(unet["block_out_channels"])).items()}
    index = {"_class_name": PIPELINES[scheduler["_class_name"]], "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", scheduler["_class_name"]], "unet": ["diffusers", "UNet2DModel"]}
    # Written beside the target and renamed at the end: a failure leaves no half-written folder.
    with written_whole(out) as tmp:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        for file, content in [("model_index.json", index), ("unet/config.json", unet),
                              ("scheduler/scheduler_config.json", scheduler)]:  # fmt: skip
            (tmp / file).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        # serialized here, written by Python: a failed write is an OSError that names the folder
        (tmp / "unet" / WEIGHTS[0]).write_bytes(safetensors.torch.save(weights, metadata={"format": "pt"}))
        (tmp / "README.md").write_text(card_markdown)
    return out
