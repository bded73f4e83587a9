"""Offline training for the four-class ConvNet: data → train → evaluate → export to the model store."""
