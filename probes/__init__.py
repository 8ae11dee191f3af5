"""Probe analysis: geometry of hidden representations, layer by layer."""
