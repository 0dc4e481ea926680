"""Write a data set as LitData shards for data=streaming: python prepare.py data=cifar10 data.root=PATH out=DIR."""

from diffusion.run.entry import prepare_main

if __name__ == "__main__":
    prepare_main()
