"""Lightning's W&B logger as this project uses it: offline by default, without deprecated wandb.init arguments,
and with the run's summary metrics declared.

Lightning passes `anonymous=None` to wandb.init, which current wandb answers with a deprecation warning on
every run; the argument does nothing, so it is not passed.

The summary of a run holds, for each metric in SUMMARY_METRICS, the aggregate named there (W&B's
`define_metric`): the best FID the run reached and its last bits/dim, so that the project's runs table (and a
sweep's group) sorts by them. W&B then shows them as `val/fid.min` and `val/bpd.last`.
"""

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

SUMMARY_METRICS = {"val/fid": "min", "val/bpd": "last"}


class WandbLogger(LightningWandbLogger):
    """`lightning.pytorch.loggers.WandbLogger`, minus the `anonymous` init argument, plus summary metrics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        fresh = self._experiment is None
        run = super().experiment
        if fresh and self._experiment is not None and callable(getattr(run, "define_metric", None)):
            for name, summary in SUMMARY_METRICS.items():  # on the step axis Lightning defines for every metric
                run.define_metric(name, summary=summary, step_metric="trainer/global_step", step_sync=True)
        return run
