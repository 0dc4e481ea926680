"""Sample a trained model: python sample.py ckpt=PATH [num_samples=N] [sampler.name=ddim] [sampler.steps=K]."""

from diffusion.run.entry import sample_main

if __name__ == "__main__":
    sample_main()
