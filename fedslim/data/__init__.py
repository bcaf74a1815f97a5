"""The bottom layer's data: datasets and their partitions, and the participation models of simulation."""
