"""Experiment configs: one file per network, presets after a colon (file.py:digits)."""
