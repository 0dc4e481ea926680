"""Export a trained model for diffusers: python export.py ckpt=PATH out=DIR [weights=ema|raw]."""

from diffusion.run.entry import export_main

if __name__ == "__main__":
    export_main()
