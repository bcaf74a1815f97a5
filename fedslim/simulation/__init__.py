"""Simulation entry points: `simulate` in Flower's engine, and the in-process grid."""
