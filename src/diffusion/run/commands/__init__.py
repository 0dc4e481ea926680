"""One module per command: train, sample, evaluate, figures, export, report."""
