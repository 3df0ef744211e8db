"""The one module that touches Covalent's internals.

Everything covalent-lot needs from Covalent goes through here, so a change in
Covalent's private layout is mended in one place: the strategy base class,
``File``/``FileTransfer``, scheme registration, the running electron's
context, and covalent.conf.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from covalent._file_transfer.enums import FtCallDepReturnValue, Order
from covalent._file_transfer.file import File, register_remote_scheme
from covalent._file_transfer.file_transfer import (
    FileTransfer,
    register_downloader,
    register_uploader,
)
from covalent._file_transfer.strategies.transfer_strategy_base import FileTransferStrategy

from ._uri import has_placeholders, render

__all__ = [
    "FileTransferStrategy",
    "File",
    "FileTransfer",
    "FtCallDepReturnValue",
    "Order",
    "read_conf_section",
    "run_context",
    "resolve_template",
    "make_file",
    "original_path",
    "register_scheme",
]

_ORIGINAL = "_lot_original"


def read_conf_section(name: str) -> dict[str, Any]:
    """``[name]`` of covalent.conf as a dict ({} when absent), read now."""
    # Imported here: importing Covalent's config module writes config files.
    from covalent._shared_files.config import get_config

    try:
        value = get_config(name)
    except (KeyError, TypeError):
        return {}
    return dict(value) if isinstance(value, dict) else value


def run_context() -> dict[str, str] | None:
    """``dispatch_id``/``node_id`` of the electron running now, or None outside one."""
    from covalent.executor.utils.context import get_context

    context = get_context()
    if context is None or context.dispatch_id is None:
        return None
    return {"dispatch_id": str(context.dispatch_id), "node_id": str(context.task_id)}


def resolve_template(text: str) -> str:
    """Fill ``{dispatch_id}``/``{node_id}`` from the running electron's context."""
    if not has_placeholders(text):
        return text
    context = run_context()
    if context is None:
        raise RuntimeError(
            f"{text!r} uses {{dispatch_id}}/{{node_id}}, which are only known while an "
            "electron runs in a dispatch; use it inside the electron (or its file "
            "transfers), or give a path without placeholders"
        )
    return render(text, context)


def make_file(text: str, *, remote: bool, is_dir: bool) -> File:
    """A Covalent ``File`` that also remembers ``text`` exactly.

    ``File`` runs paths through furl, which percent-encodes ``{`` and spaces
    and folds ``..``; the strategies read back the original.
    """
    if remote:
        # Covalent refuses File("az://...") for schemes it does not know.
        register_remote_scheme(text.split("://", 1)[0].lower())
    file = File(text, is_remote=remote, is_dir=is_dir)
    setattr(file, _ORIGINAL, text)
    return file


def original_path(file: File, *, remote: bool) -> str:
    """The path or URI a ``File`` was made from."""
    original = getattr(file, _ORIGINAL, None)
    if original is not None:
        return original
    return unquote(file.uri if remote else file.filepath)


def register_scheme(scheme: str, strategy_cls: type) -> None:
    """Make ``File("<scheme>://...")`` and guessed transfers use ``strategy_cls``."""
    register_uploader(scheme, strategy_cls)
    register_downloader(scheme, strategy_cls)
