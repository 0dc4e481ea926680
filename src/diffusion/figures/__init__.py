"""The paper's figures of a trained model, as tensors and as files."""
