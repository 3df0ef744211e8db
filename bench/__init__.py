"""Benchmarks of covalent-lot: scripts that print tables and write bench/results/.

Run from the repository root as ``python -m bench.suite`` (``make bench``); the
storage servers come from the integration harness, imported as the package
``integration``.
"""
