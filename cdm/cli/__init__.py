"""Thin command-line entry points (Hydra)."""
