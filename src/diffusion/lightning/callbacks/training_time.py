"""The seconds a model's training took, in every checkpoint: what the sampler table prints as a tuned model's cost.

Lightning's Timer (no time limit) sums the training stage's seconds over resumes (its state is restored from the
checkpoint); this adds the devices they ran on, since seconds on a CPU and on a GPU are not the same cost.
"""

import torch
from lightning.pytorch.callbacks import Timer


class TrainingTime(Timer):
    def __init__(self):
        super().__init__(duration=None)
        self.devices = "unknown"

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        self.devices = f"{trainer.world_size}× {name}"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "devices": self.devices}


def training_time(checkpoint: dict) -> tuple[float, str] | None:
    """(training seconds, the devices) a checkpoint records, or None (written before it did, or without the
    callback)."""
    state = checkpoint.get("callbacks", {}).get(TrainingTime.__qualname__)
    if not state:
        return None
    return float(state["time_elapsed"]["train"]), str(state.get("devices", "unknown"))
