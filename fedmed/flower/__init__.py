"""fedmed on Flower: the ServerApp, the ClientApp and what they exchange."""
