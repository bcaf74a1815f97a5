"""Server side: the ServerApp round loop, its state and the communication log."""
