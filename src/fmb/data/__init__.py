"""Data foundation: readers for the real formats and synthetic generators writing those formats."""
