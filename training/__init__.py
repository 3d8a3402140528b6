"""Offline training: from an event file to a versioned autoencoder bundle, plus batch scoring and evaluation."""

__version__ = "0.1.0"
