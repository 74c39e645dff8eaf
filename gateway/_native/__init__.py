"""Compiled hot path, built from csrc/ (see setup.py)."""
