"""Storage URIs: parsed once into a small value type, validated with clear errors.

Keys are taken literally: no percent-decoding, so a key may hold any character
the service allows except the few that would make the URI ambiguous (``?``,
``#``) or unsafe to map onto a local path (``.``/``..`` segments, ``//``).
Two placeholders may stand in a key: ``{dispatch_id}`` and ``{node_id}``; they
are resolved when a transfer runs inside an electron (see ``render``). A local
path may also start with ``{staging}`` (the staging folder of the machine the
electron runs on) and hold ``{run}`` (the dispatch id, or a token of the task's
process where no dispatch id is known); both are filled on the executor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "StoreURI", "parse_uri", "PLACEHOLDERS", "STAGING", "RUN", "check_template", "render",
    "placeholders",
]

PLACEHOLDERS = ("dispatch_id", "node_id")
STAGING = "staging"  # local paths only, and only at the start
RUN = "run"  # local paths only
_BRACES = re.compile(r"\{([^{}]*)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_template(text: str, what: str, *, local: bool = False) -> None:
    """Reject braces that are not one of the known placeholders (``local``: of a
    local path, which may also hold ``{staging}`` at its start and ``{run}``)."""
    known = PLACEHOLDERS + ((STAGING, RUN) if local else ())
    for name in _BRACES.findall(text):
        if name not in known:
            raise ValueError(
                f"{what} {text!r} has an unknown placeholder {{{name}}}: only "
                + ", ".join("{" + p + "}" for p in known)
                + " are resolved"
            )
    if local and "{" + STAGING + "}" in text and not text.startswith("{" + STAGING + "}/"):
        raise ValueError(
            f"{what} {text!r}: {{{STAGING}}} stands for a folder and must start the path, "
            f"as in {{{STAGING}}}/features.npy"
        )
    stripped = _BRACES.sub("", text)
    if "{" in stripped or "}" in stripped:
        raise ValueError(
            f"{what} {text!r} has an unbalanced brace; placeholders are written "
            "{dispatch_id} or {node_id}, with single braces"
        )


def render(text: str, values: dict[str, str]) -> str:
    """Fill the placeholders of ``text`` from ``values``."""
    return _BRACES.sub(lambda m: str(values[m.group(1)]), text)


def has_placeholders(text: str) -> bool:
    return bool(_BRACES.search(text))


def placeholders(text: str) -> set[str]:
    return set(_BRACES.findall(text))


@dataclass(frozen=True)
class StoreURI:
    """``scheme://bucket/key``; a key that is empty or ends in ``/`` names a folder."""

    scheme: str
    bucket: str
    key: str

    @property
    def is_folder(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def name(self) -> str:
        """Last segment of the key (without a trailing slash)."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]

    def child(self, relative: str) -> "StoreURI":
        """The object ``relative`` below this folder."""
        if not self.is_folder:
            raise ValueError(
                f"{self} is not a folder URI (it does not end with '/'); use {self}/ for a folder"
            )
        return StoreURI(self.scheme, self.bucket, self.key + relative)

    def as_folder(self) -> "StoreURI":
        return self if self.is_folder else StoreURI(self.scheme, self.bucket, self.key + "/")

    def render(self, values: dict[str, str]) -> "StoreURI":
        return StoreURI(self.scheme, self.bucket, render(self.key, values))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def parse_uri(uri: str, schemes: tuple[str, ...] | None = None) -> StoreURI:
    """Parse ``uri``; ``schemes`` limits which schemes are accepted."""
    if not isinstance(uri, str):
        raise TypeError(f"a storage URI must be a str, not {type(uri).__name__}: {uri!r}")

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid storage URI {uri!r}: {why}")

    match = _SCHEME.match(uri)
    if not match:
        raise bad("expected scheme://bucket/key, e.g. s3://my-bucket/runs/data.npy")
    scheme = match.group(1).lower()
    if schemes is not None and scheme not in schemes:
        raise bad(
            f"scheme {scheme!r} is not one of {', '.join(schemes)}; use the strategy for "
            f"{scheme}:// (covalent_lot.strategy_for picks it from the URI)"
        )
    rest = uri[match.end():]
    control = _CONTROL.search(rest)
    if control:
        raise bad(f"control characters are not allowed (found {control.group()!r}); remove them")
    if "?" in rest or "#" in rest:
        raise bad("query strings and fragments ('?', '#') are not supported; pass options as arguments")
    bucket, sep, key = rest.partition("/")
    if not bucket:
        raise bad(f"no bucket name; expected {scheme}://bucket/key")
    if not sep:
        raise bad(f"no key; use {scheme}://{bucket}/ for the whole bucket as a folder")
    if key.startswith("/"):
        raise bad("the key starts with '/' (empty path segment); write one '/' after the bucket")
    segments = key.split("/")
    inner = segments[:-1] if key.endswith("/") else segments
    for segment in inner:
        if segment == "" and key:
            raise bad("empty path segment ('//'); join path segments with a single '/'")
        if segment in (".", ".."):
            raise bad(
                f"'{segment}' path segments are not allowed; write the key in full, without them"
            )
    check_template(key, "key of URI")
    if _BRACES.search(bucket):
        raise bad(
            "placeholders are only resolved in the key, not in the bucket name; move them to the key"
        )
    return StoreURI(scheme, bucket, key)
