"""Data preparation (raw -> WebDataset shards) and streaming (shards -> batches)."""
