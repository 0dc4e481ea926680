"""What the entry points run: train(cfg), sample(cfg), and the helpers tests reach for."""

from diffusion.run.evaluation import evaluate
from diffusion.run.figures import figures
from diffusion.run.sampling import load_module, sample
from diffusion.run.training import build_module, objective, resolve_ckpt_path, train

__all__ = ["build_module", "evaluate", "figures", "load_module", "objective", "resolve_ckpt_path", "sample", "train"]
