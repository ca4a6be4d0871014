"""Name and layout mapping between PyTorch checkpoints and our parameter pytrees."""
