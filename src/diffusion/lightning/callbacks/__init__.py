"""Callbacks: work training could run without (EMA, post-hoc EMA snapshots, sample grids, quality, figures,
schedule plots, the loss-by-t file, checks).

Nothing imports them but run/ and the tests; what two of them need lives a layer down (images, sampling).
"""

from diffusion.lightning.callbacks.ddp_check import RanksInSync
from diffusion.lightning.callbacks.ema import EMA, averaged_net
from diffusion.lightning.callbacks.figures_callback import PaperFigures
from diffusion.lightning.callbacks.interrupt import GracefulInterrupt
from diffusion.lightning.callbacks.loss_by_t import LossByTLog
from diffusion.lightning.callbacks.posthoc_snapshots import PostHocEMA
from diffusion.lightning.callbacks.progress import StepProgressBar
from diffusion.lightning.callbacks.rng import RNGState
from diffusion.lightning.callbacks.sample_grid import SampleGrid
from diffusion.lightning.callbacks.sample_quality import SampleQualityCallback
from diffusion.lightning.callbacks.schedule_log import ScheduleLogger
from diffusion.lightning.callbacks.training_time import TrainingTime, training_time

__all__ = ["EMA", "GracefulInterrupt", "LossByTLog", "PaperFigures", "PostHocEMA", "RNGState", "RanksInSync",
           "SampleGrid", "SampleQualityCallback", "ScheduleLogger", "StepProgressBar", "TrainingTime", "averaged_net",
           "training_time"]
