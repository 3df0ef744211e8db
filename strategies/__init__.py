"""Backends of covalent-lot, one module each; each imports its SDK lazily.

Installed as ``covalent_lot.strategies``.
"""
