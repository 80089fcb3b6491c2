"""abvid.train: objectives, the training loop, checkpoints, embedding and probes."""
