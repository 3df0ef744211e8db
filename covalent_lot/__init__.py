"""covalent-lot: large objects between Covalent electrons, through object storage.

    import covalent as ct
    import covalent_lot as lot

    h = lot.handoff("s3://my-bucket/runs/{dispatch_id}/features.npy")

    @ct.electron(files=[h.upload()])
    def produce(files=[]):
        np.save(h.path, make_features())

    @ct.electron(files=[h.download()])
    def consume(files=[]):
        return np.load(h.path).sum()

Importing this package imports no cloud SDK and reads no configuration;
Covalent itself is imported on first use of the factories or strategies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ChecksumMismatchError
from ._retry import RetryPolicy
from ._uri import StoreURI, parse_uri

__version__ = "0.1.0"

__all__ = [
    "ChecksumMismatchError",
    "Handoff",
    "Ref",
    "RetryPolicy",
    "StoreURI",
    "TransferStats",
    "cleanup",
    "download",
    "handoff",
    "offload",
    "parse_uri",
    "register",
    "strategy_for",
    "upload",
]

_LAZY = {
    "Handoff": "._handoff",
    "handoff": "._handoff",
    "upload": "._handoff",
    "download": "._handoff",
    "cleanup": "._handoff",
    "register": "._strategy",
    "strategy_for": "._strategy",
    "TransferStats": "._engine",
    "offload": "._offload",
    "Ref": "._offload",
}

if TYPE_CHECKING:  # pragma: no cover
    from ._engine import TransferStats
    from ._handoff import Handoff, cleanup, download, handoff, upload
    from ._offload import Ref, offload
    from ._strategy import register, strategy_for


def __getattr__(name: str) -> Any:
    # Covalent is imported only when these are first used: importing it writes
    # its config files, which a bare ``import covalent_lot`` should not do.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'covalent_lot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
