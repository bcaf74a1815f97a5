"""Deploying fedslim on real devices: credentials, Flower connections and the commands that start a federation."""
