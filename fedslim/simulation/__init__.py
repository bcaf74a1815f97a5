"""Datasets, partitions and the `simulate` entry point."""
