"""Data pipeline: raw corpus reading, pre-training instance generation, sharded storage and loading."""
