"""Callbacks: work training could run without (EMA, post-hoc EMA snapshots, sample grids, quality, figures,
schedule plots, the loss-by-t file, checks).

Nothing imports them but run/ and the tests; what two of them need lives a layer down (images, sampling).
"""

from diffusion.callbacks.ddp_check import RanksInSync
from diffusion.callbacks.ema import EMA, averaged_net
from diffusion.callbacks.figures_callback import PaperFigures
from diffusion.callbacks.interrupt import GracefulInterrupt
from diffusion.callbacks.loss_by_t import LossByTLog
from diffusion.callbacks.posthoc_ema import PostHocEMA
from diffusion.callbacks.progress import StepProgressBar
from diffusion.callbacks.rng import RNGState
from diffusion.callbacks.sample_grid import SampleGrid
from diffusion.callbacks.sample_quality import SampleQualityCallback
from diffusion.callbacks.schedule_log import ScheduleLogger

__all__ = ["EMA", "GracefulInterrupt", "LossByTLog", "PaperFigures", "PostHocEMA", "RNGState", "RanksInSync",
           "SampleGrid", "SampleQualityCallback", "ScheduleLogger", "StepProgressBar", "averaged_net"]
