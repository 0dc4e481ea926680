"""Preflight: what a run will need later, checked before its first step or its first image.

The config's values were checked when it was composed (config/validation.py). Here the environment is: the
folders the run will write (found unwritable only after hours of work otherwise), the device, the data on disk,
the feature extractor, the Trainer's arguments, and W&B online (a missing key is an error; a server that cannot
be reached within seconds makes the run log offline, with one line saying so, so that a network blip on a
cluster node never costs the run).
"""

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, open_dict

from diffusion.errors import UserError
from diffusion.files import blocking_file, probe_writable

WANDB_TIMEOUT_S = 5.0


def writable_dir(path: str | Path, key: str) -> Path:
    """The folder, created if needed, after writing and removing a probe file in it."""
    path = Path(path).expanduser()
    try:
        probe_writable(path)
    except OSError as err:
        above = path if path.exists() and not path.is_dir() else blocking_file(path)
        reason = f"{above} is a file, not a folder" if above is not None else err.strerror or err
        raise UserError(f"{key}={path} cannot be written ({reason}); choose a folder you can write, "
                        f"e.g. {key}=$HOME/diffusion-outputs, or fix its permissions") from err
    return path


def check_device(device: str, key: str = "device") -> str:
    """`auto` resolved; a CUDA device that is not there is an error before anything is loaded."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise UserError(f"{key}={device} but this machine has {visible} CUDA device(s); use {key}=cpu or "
                            f"{key}=auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}=mps but MPS is not available here; use {key}=cpu or {key}=auto")
    return device


def check_logger(logger: DictConfig | None, key: str = "logger") -> None:
    """W&B: its folder writable; online, a key, and a server that answers within seconds (else offline)."""
    if logger is None:
        return
    writable_dir(logger.save_dir, f"{key}.save_dir")
    if logger.offline:
        return
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(url).hostname or url
    if not (os.environ.get("WANDB_API_KEY") or _netrc_key(host)):
        raise UserError(f"{key}.offline=false but no W&B API key is set for {host} (WANDB_API_KEY or `wandb "
                        f"login`); log in, or keep {key}.offline=true and upload later with `wandb sync`")
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=WANDB_TIMEOUT_S).close()
    except OSError as err:
        print(f"warning: W&B server {url} cannot be reached ({err.strerror or err}); logging offline to "
              f"{logger.save_dir}/wandb instead, upload it later with `wandb sync`", flush=True)
        with open_dict(logger):
            logger.offline = True


def _netrc_key(host: str) -> str | None:
    try:
        found = netrc.netrc().authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return found[2] if found else None


def build_trainer(factory, **kwargs):
    """The Trainer, its argument errors (devices a machine does not have, ...) as one line."""
    try:
        return factory(**kwargs)
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise UserError(f"trainer: {' '.join(str(err).split())}; fix the trainer.* settings (trainer=cpu runs "
                        "anywhere)") from err
