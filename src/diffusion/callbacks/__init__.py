"""Callbacks: work that training could run without (EMA, sample grids, schedule plots)."""

from diffusion.callbacks.ema import EMA
from diffusion.callbacks.interrupt import GracefulInterrupt
from diffusion.callbacks.rng import RNGState
from diffusion.callbacks.samples import SampleGrid, generate
from diffusion.callbacks.schedule_log import ScheduleLogger

__all__ = ["EMA", "GracefulInterrupt", "RNGState", "SampleGrid", "ScheduleLogger", "generate"]
