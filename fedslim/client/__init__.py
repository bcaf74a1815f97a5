"""Client side: the resident base, local training of the fast layer, encoding."""
