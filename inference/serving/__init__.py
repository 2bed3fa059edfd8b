"""Serving: one module per API over a shared base (see base.py)."""
