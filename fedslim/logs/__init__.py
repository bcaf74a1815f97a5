"""Reading, comparing, exporting and plotting communication logs: the `fedslim logs` command."""
