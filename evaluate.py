"""Evaluate a checkpoint: python evaluate.py ckpt=PATH [num_samples=N] [sampler.name=ddim sampler.steps=50]."""

from diffusion.run.entry import evaluate_main

if __name__ == "__main__":
    evaluate_main()
