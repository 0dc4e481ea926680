"""The paper's figures of a trained model: python figures.py ckpt=PATH [data=digits] [output_dir=DIR] [num_images=N]."""

from diffusion.run.entry import figures_main

if __name__ == "__main__":
    figures_main()
