"""What commands write about runs: the sweep report, the sampler and guidance tables, the model card."""
