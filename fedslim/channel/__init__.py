"""The channel between client and server, both directions: protocol, uplink, downlink and their byte accounting."""
