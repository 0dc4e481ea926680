"""Lightning glue: the LightningModule, the evaluation loop, checkpoints, DDP, the W&B logger and callbacks.

Everything here takes plain Python objects; nothing imports Hydra or OmegaConf.
"""
