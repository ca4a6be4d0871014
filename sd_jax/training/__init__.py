"""Training: objectives, optimizer, sharded jitted steps, data, checkpoints."""
