"""Codecs behind ``Handoff.save``/``Handoff.load``: one Python object <-> one file.

The suffix of the handoff's URI decides the format (not the local path's, which
may be anything), on save and on load alike, so a consumer needs nothing but
the handoff to read what the producer wrote:

=============================  ==========================================  ====================
suffix (case-insensitive)      holds                                       ``load()`` returns
=============================  ==========================================  ====================
``.npy``                       a numpy array (``np.save``, no pickle)      ``numpy.ndarray``;
                                                                           ``load(mmap=True)``:
                                                                           a read-only memmap
``.parquet``, ``.pq``          a pandas DataFrame (needs pyarrow)          ``pandas.DataFrame``
``.pkl``, ``.pickle``          any picklable object (pickle)               the object
``.txt``, ``.json``, ``.csv``,  a str, as UTF-8 text (written as given:    ``str``
``.tsv``, ``.md``, ``.yaml``,   ``.json`` holds JSON *text*, e.g.
``.yml``, ``.xml``, ``.html``,  ``json.dumps(d)``)
``.log``
any other suffix, or none      bytes, bytearray or memoryview (raw)        ``bytes``
=============================  ==========================================  ====================

The suffix to pick for an object's type (named in the error when they do not
match): numpy array -> ``.npy``; DataFrame -> ``.parquet`` when pyarrow is
installed, else ``.pkl``; bytes-like -> ``.bin``; str -> ``.txt``; anything
else -> ``.pkl``.

numpy, pandas and pyarrow are imported only when a file of theirs is read or
written (an object can only be an ndarray if numpy is already imported).
``save`` writes a temporary file beside the target (``.<name>.lot-partial-<rand>``,
the name downloads use) and renames it into place, so an electron that fails
half-way never leaves a half-written file for the post-exec upload.

Pickle runs code when it loads: load ``.pkl`` objects only from stores you
trust (the sha256 check proves the bytes are the ones uploaded, not who
uploaded them).
"""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from ._stream import atomic_download

__all__ = ["Codec", "CODECS", "codec_for", "suffix_for", "save", "load"]

TEXT_SUFFIXES = (".txt", ".json", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xml", ".html", ".log")


@dataclass(frozen=True)
class Codec:
    name: str
    suffixes: tuple[str, ...]  # empty: every suffix no other codec claims
    holds: str  # what a file of this kind holds, for messages
    accepts: Callable[[Any], bool]
    write: Callable[[Any, BinaryIO], None]
    read: Callable[[str, bool], Any]  # (path, mmap)


def _loaded_instance(module: str, cls: str) -> Callable[[Any], bool]:
    """A type check that never imports ``module``: if it is not imported yet,
    no object can be an instance of its class."""

    def check(obj: Any) -> bool:
        mod = sys.modules.get(module)
        return mod is not None and isinstance(obj, getattr(mod, cls))

    return check


def _pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "parquet files (.parquet, .pq) need pyarrow: pip install pyarrow "
            "(or name the handoff .pkl to pickle the DataFrame instead)"
        ) from exc


def _has_pyarrow() -> bool:
    try:
        _pyarrow()
    except ImportError:
        return False
    return True


def _write_npy(array: Any, f: BinaryIO) -> None:
    import numpy as np

    np.save(f, array, allow_pickle=False)  # a file object: np.save would append ".npy" to a path


def _read_npy(path: str, mmap: bool) -> Any:
    import numpy as np

    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


def _write_parquet(frame: Any, f: BinaryIO) -> None:
    _pyarrow()
    frame.to_parquet(f, engine="pyarrow")


def _read_parquet(path: str, mmap: bool) -> Any:
    _pyarrow()
    import pandas as pd

    return pd.read_parquet(path, engine="pyarrow")


def _read_pickle(path: str, mmap: bool) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def _read_bytes(path: str, mmap: bool) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_text(path: str, mmap: bool) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


NUMPY = Codec("numpy", (".npy",), "a numpy array (np.save)",
              _loaded_instance("numpy", "ndarray"), _write_npy, _read_npy)
PARQUET = Codec("parquet", (".parquet", ".pq"), "a pandas DataFrame (parquet, needs pyarrow)",
                _loaded_instance("pandas", "DataFrame"), _write_parquet, _read_parquet)
PICKLE = Codec("pickle", (".pkl", ".pickle"), "any picklable object (pickle)",
               lambda obj: True, lambda obj, f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL),
               _read_pickle)
TEXT = Codec("text", TEXT_SUFFIXES, "a str (UTF-8 text)",
             lambda obj: isinstance(obj, str), lambda text, f: f.write(text.encode("utf-8")), _read_text)
BYTES = Codec("bytes", (), "bytes, bytearray or memoryview (raw bytes)",
              lambda obj: isinstance(obj, (bytes, bytearray, memoryview)), lambda data, f: f.write(data),
              _read_bytes)

CODECS = (NUMPY, PARQUET, PICKLE, TEXT, BYTES)
_BY_SUFFIX = {suffix: codec for codec in CODECS for suffix in codec.suffixes}


def _suffix(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[1].lower()


def codec_for(path: str) -> Codec:
    """The codec a file's suffix selects (raw bytes for any suffix not in the table)."""
    return _BY_SUFFIX.get(_suffix(path), BYTES)


def suffix_for(obj: Any) -> str:
    """The suffix that stores ``obj``'s type best (see the module's table)."""
    if NUMPY.accepts(obj):
        return ".npy"
    if PARQUET.accepts(obj):
        return ".parquet" if _has_pyarrow() else ".pkl"
    if BYTES.accepts(obj):
        return ".bin"
    if TEXT.accepts(obj):
        return ".txt"
    return ".pkl"


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def save(obj: Any, path: str, name: str | None = None) -> None:
    """Write ``obj`` to ``path``, atomically, in the format the suffix of ``name``
    (a handoff's URI; default: ``path``) selects."""
    name = path if name is None else name
    codec = codec_for(name)
    if not codec.accepts(obj):
        suffix = _suffix(name) or "a name without a suffix"
        fits = suffix_for(obj)
        raise TypeError(
            f"cannot save a {_type_name(obj)} to {name!r}: {suffix} holds {codec.holds}. "
            f"A {_type_name(obj)} goes to a {fits} name ({_BY_SUFFIX.get(fits, BYTES).holds}): end the "
            f"handoff's URI with {fits}, or convert the object to what {suffix} holds"
        )
    with atomic_download(path, fsync=False) as (f, _temp):  # temporary file, then rename
        codec.write(obj, f)


def load(path: str, mmap: bool = False, name: str | None = None) -> Any:
    """Read the object at ``path`` in the format the suffix of ``name`` (default:
    ``path``) selects."""
    codec = codec_for(path if name is None else name)
    if mmap and codec is not NUMPY:
        raise ValueError(f"mmap=True memory-maps .npy files; {name or path!r} holds {codec.holds}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no file at {path!r} to load: does this electron declare files=[h.download()] "
            "(or, in the producer, call h.save first)?"
        )
    return codec.read(path, mmap)
