"""fedmed: federated, differentially private medical-image classification."""

__version__ = "0.1.0"
