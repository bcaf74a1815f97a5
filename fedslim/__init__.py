"""fedslim: federated learning where the base stays home and only a fast layer travels."""

__version__ = "0.1.0"
