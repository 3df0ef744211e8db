"""Integration tests of covalent-lot against real servers on 127.0.0.1, and the
harness that starts those servers (``_servers``, ``_kits``, ``_kit_<name>``...).

A package, so that its tests and bench/ import one copy of each harness module
(one registry of live servers, one kit registry): ``from integration import
_kits``. Run its scripts from the repository root as ``python -m integration.demo``.
"""
