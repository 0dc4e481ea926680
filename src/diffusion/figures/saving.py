"""Figures written whole: every plot a command or callback draws is saved through `save_figure`."""

from pathlib import Path

from diffusion.files import written_whole


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Save a matplotlib figure at `path` whole or not at all (diffusion.files.written_whole), then close it."""
    import matplotlib.pyplot as plt  # the caller drew the figure, so pyplot (and its backend) is loaded already

    try:
        with written_whole(path) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
