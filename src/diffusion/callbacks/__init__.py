"""Callbacks: work that training could run without (EMA, post-hoc EMA snapshots, sample grids, schedule plots)."""

from diffusion.callbacks.ddp_check import RanksInSync
from diffusion.callbacks.ema import EMA
from diffusion.callbacks.figures import PaperFigures
from diffusion.callbacks.interrupt import GracefulInterrupt
from diffusion.callbacks.posthoc_ema import PostHocEMA
from diffusion.callbacks.quality import SampleQualityCallback
from diffusion.callbacks.rng import RNGState
from diffusion.callbacks.samples import SampleGrid, generate
from diffusion.callbacks.schedule_log import ScheduleLogger

__all__ = ["EMA", "GracefulInterrupt", "PaperFigures", "PostHocEMA", "RNGState", "RanksInSync", "SampleGrid",
           "SampleQualityCallback", "ScheduleLogger", "generate"]
