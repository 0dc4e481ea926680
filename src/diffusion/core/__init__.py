"""The diffusion math in plain PyTorch: schedules, the Gaussian process, likelihoods, objectives and samplers.

Nothing here imports Lightning, Hydra, OmegaConf, W&B or torchmetrics; everything is checked against float64
reference formulas in tests/core.
"""
