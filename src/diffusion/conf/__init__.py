"""The Hydra configs, one group per concern (shipped with the package; the repository's conf/ links here)."""
