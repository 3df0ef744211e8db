"""Factories: one storage URI in, the matching Covalent file transfers out."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from ._covalent import FileTransfer, Order, make_file, resolve_template
from ._strategy import LotStrategy, strategy_for
from ._uri import check_template

__all__ = ["Handoff", "handoff", "upload", "download"]


def _strategy(uri: str, strategy: LotStrategy | None, options: dict[str, Any]) -> LotStrategy:
    if strategy is not None and options:
        raise TypeError(
            f"give either strategy= or options ({', '.join(options)}), not both"
        )
    return strategy if strategy is not None else strategy_for(uri, **options)


def _check_local(local_path: str) -> None:
    if not isinstance(local_path, str):
        raise TypeError(f"local path must be a str, not {type(local_path).__name__}: {local_path!r}")
    check_template(local_path, "local path")
    if not os.path.isabs(local_path):
        raise ValueError(
            f"local path {local_path!r} must be absolute: electrons run in another "
            "working directory"
        )


def _transfer(strategy: LotStrategy, uri: str, local_path: str, order: Order) -> FileTransfer:
    _check_local(local_path)
    location = strategy.parse(uri)
    folder = location.is_folder
    if folder and not local_path.endswith("/"):
        local_path += "/"
    remote = make_file(uri, remote=True, is_dir=folder)
    local = make_file(local_path, remote=False, is_dir=folder)
    if order is Order.AFTER:
        return FileTransfer(from_file=local, to_file=remote, order=order, strategy=strategy)
    return FileTransfer(from_file=remote, to_file=local, order=order, strategy=strategy)


def upload(uri: str, local_path: str, *, strategy: LotStrategy | None = None, **options: Any) -> FileTransfer:
    """A post-exec transfer: after the electron returns, upload ``local_path`` to ``uri``."""
    return _transfer(_strategy(uri, strategy, options), uri, local_path, Order.AFTER)


def download(uri: str, local_path: str, *, strategy: LotStrategy | None = None, **options: Any) -> FileTransfer:
    """A pre-exec transfer: before the electron runs, download ``uri`` to ``local_path``."""
    return _transfer(_strategy(uri, strategy, options), uri, local_path, Order.BEFORE)


class Handoff:
    """One stored object (or folder) passed from a producer electron to consumers.

    ``uri`` and ``local_path`` may hold ``{dispatch_id}`` and ``{node_id}``,
    filled in on the executor when the transfer runs, so concurrent dispatches
    never share a key or a local file. ``path`` is the local path resolved for
    the electron that is running now.
    """

    def __init__(self, uri: str, local_path: str | None = None, *,
                 strategy: LotStrategy | None = None, **options: Any):
        self.strategy = _strategy(uri, strategy, options)
        location = self.strategy.parse(uri)
        self.uri = uri
        if local_path is None:
            staging = self.strategy.settings["staging_dir"]
            if staging is None:
                staging = os.path.join(tempfile.gettempdir(), "covalent-lot")
            name = location.name or location.bucket  # s3://bucket/ names the whole bucket
            # One local path per (dispatch, URI), the same in the producer and its
            # consumers: a consumer on the producer's machine finds the verified
            # file already there and skips the download (option reuse_local).
            tag = hashlib.sha256(uri.encode()).hexdigest()[:12]
            local_path = os.path.join(staging, "{dispatch_id}", tag, name)
            if location.is_folder:
                local_path += "/"
        _check_local(local_path)
        self.local_path = local_path

    @property
    def path(self) -> str:
        """The local path for the electron running now (placeholders filled)."""
        return resolve_template(self.local_path)

    def upload(self) -> FileTransfer:
        """For the producer: ``@ct.electron(files=[h.upload()])``."""
        return _transfer(self.strategy, self.uri, self.local_path, Order.AFTER)

    def download(self) -> FileTransfer:
        """For a consumer: ``@ct.electron(files=[h.download()])``."""
        return _transfer(self.strategy, self.uri, self.local_path, Order.BEFORE)

    def __repr__(self) -> str:
        return f"Handoff({self.uri!r}, local_path={self.local_path!r})"


def handoff(uri: str, local_path: str | None = None, *,
            strategy: LotStrategy | None = None, **options: Any) -> Handoff:
    """Make the producer/consumer pair for ``uri``; see :class:`Handoff`."""
    return Handoff(uri, local_path, strategy=strategy, **options)
