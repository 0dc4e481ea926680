"""Train a DDPM: python train.py [experiment=digits] [group=option] [key=value] ... (-m to sweep)."""

from diffusion.run.entry import train_main

if __name__ == "__main__":
    train_main()
