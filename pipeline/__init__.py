"""abvid.pipeline: everything from video file to batch of transitions (CPU only)."""
