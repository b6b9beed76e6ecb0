"""Checkpoint formats: how each kind of checkpoint folder is staged, described, restored and read for weights."""
