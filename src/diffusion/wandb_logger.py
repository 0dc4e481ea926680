"""Lightning's W&B logger as this project uses it: offline by default, without deprecated wandb.init arguments.

Lightning passes `anonymous=None` to wandb.init, which current wandb answers with a deprecation warning on
every run; the argument does nothing, so it is not passed.
"""

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """`lightning.pytorch.loggers.WandbLogger`, minus the `anonymous` init argument (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
