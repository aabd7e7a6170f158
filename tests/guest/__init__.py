"""Tiny Linux test guest builder (see build.py)."""
