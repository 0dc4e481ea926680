"""What the entry points run: train(cfg), sample(cfg), evaluate(cfg), figures(cfg), report(dirs), export(cfg),
and helpers tests reach for."""

from diffusion.run.evaluate_command import evaluate
from diffusion.run.export_command import export
from diffusion.run.figures_command import figures
from diffusion.run.report_command import report
from diffusion.run.sample_command import sample
from diffusion.run.train_command import build_module, objective, resolve_ckpt_path, train

__all__ = ["build_module", "evaluate", "export", "figures", "objective", "report", "resolve_ckpt_path", "sample",
           "train"]
