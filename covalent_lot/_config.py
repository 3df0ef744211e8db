"""Options: typed specs, validated once, resolved with one precedence rule.

Precedence, highest first (explicit arguments are checked with ``is not None``,
so an explicit ``0`` or ``False`` is kept):

1. explicit argument to the strategy or factory
2. environment: ``COVALENT_LOT_<SECTION>_<OPTION>``, then ``COVALENT_LOT_<OPTION>``
   for options shared by every backend (e.g. ``COVALENT_LOT_S3_ENDPOINT_URL``,
   ``COVALENT_LOT_MAX_ATTEMPTS``)
3. covalent.conf: ``[lot.<section>.stores.<store>]`` when a store is chosen,
   then ``[lot.<section>]``, then ``[lot]`` for shared options
4. the built-in default

A *store* is a named set of options for one backend, so one process can reach
two endpoints (say MinIO and AWS) without passing their options around::

    [lot.s3]
    region_name = "us-east-1"
    [lot.s3.stores.minio]
    endpoint_url = "http://minio.internal:9000"
    addressing_style = "path"

It is chosen by the ``store`` argument (``S3Strategy(store="minio")``,
``strategy_for(uri, store="minio")``), else by ``COVALENT_LOT_<SECTION>_STORE``;
without either, no store applies. ``store`` is a name, not an option: it is
not in the resolved values (``Settings.store`` holds it).

covalent.conf is read through Covalent's own config reader when a strategy is
built (never at import time). Unknown keys in ``[lot]``/``[lot.<section>]``/
``[lot.<section>.stores.<store>]``, unknown stores and unknown arguments are
errors, with the closest known name suggested.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ._checksum import ALGORITHMS as CHECKSUM_ALGORITHMS, DEFAULT as CHECKSUM_DEFAULT

__all__ = [
    "Option", "Settings", "resolve", "parse_size", "COMMON_OPTIONS", "BACKEND_SECTIONS", "STORE", "LOT_ONLY_KEYS",
]

BACKEND_SECTIONS = ("s3", "gcs", "azure", "sftp")
STORE = "store"  # the argument naming a store; STORES, the table of them in a section
STORES = "stores"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """``16777216``, ``"16MiB"``, ``"16 MB"``, ``"1.5GiB"`` -> bytes."""
    if isinstance(value, bool):
        raise TypeError("a size cannot be a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, unit = match.group(1), (match.group(2) or "").lower()
            power = 0 if unit in ("", "b") else "kmgt".index(unit[0]) + 1
            base = 1024 if "i" in unit else 1000
            size = float(number) * base**power
            if size.is_integer():
                return int(size)
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '16MiB')")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r} (use a whole number such as 8)")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"not an integer: {value!r} (use a whole number such as 8)")


def _parse_float(value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"not a number: {value!r} (use e.g. 30 or 2.5)")
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r} (use e.g. 30 or 2.5)")
    return number


def _parse_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"not a string: {value!r} (quote it in covalent.conf)")


def _parse_url(value: Any) -> str:
    text = _parse_str(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    return text


def _parse_abspath(value: Any) -> str:
    text = _parse_str(value)
    if not os.path.isabs(os.path.expanduser(text)):
        raise ValueError(f"must be an absolute path (electrons run in another working directory), got {text!r}")
    return text


def _parse_envname(value: Any) -> str:
    text = _parse_str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        # The value may be the secret itself, pasted by mistake: never show it.
        raise ValueError("must be the NAME of an environment variable (letters, digits, '_'), not "
                         "its value; set the secret itself in the executor's environment")
    return text


PARSERS: dict[str, Callable[[Any], Any]] = {
    "size": parse_size,
    "int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "str": _parse_str,
    "url": _parse_url,  # an http(s) endpoint
    "abspath": _parse_abspath,  # a path read on the executor, wherever the electron runs
    "envname": _parse_envname,  # the name of an environment variable holding a secret
}


@dataclass(frozen=True)
class Option:
    """One option: its type, default, bounds and documentation."""

    kind: str  # a key of PARSERS
    default: Any
    doc: str
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    maximum: float | None = None
    multiple_of: int | None = None  # sizes a protocol takes only in whole units

    def coerce(self, name: str, value: Any, origin: str) -> Any:
        try:
            parsed = PARSERS[self.kind](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {name} from {origin}: {exc}") from None
        if self.minimum is not None and parsed < self.minimum:
            shown = f"{int(self.minimum):,} bytes" if self.kind == "size" else self.minimum
            raise ValueError(f"option {name} from {origin} must be >= {shown}, got {value!r}")
        if self.maximum is not None and parsed > self.maximum:
            shown = f"{int(self.maximum):,} bytes" if self.kind == "size" else self.maximum
            raise ValueError(f"option {name} from {origin} must be <= {shown}, got {value!r}")
        if self.multiple_of is not None and parsed is not None and parsed % self.multiple_of:
            lower = max(self.multiple_of, parsed - parsed % self.multiple_of)
            unit = f"{self.multiple_of // 1024} KiB ({self.multiple_of:,} bytes)" \
                if self.multiple_of % 1024 == 0 else f"{self.multiple_of:,} bytes"
            raise ValueError(
                f"option {name} from {origin} must be a multiple of {unit}, got {parsed:,} bytes; "
                f"e.g. {lower:,}"
            )
        if self.choices is not None and parsed not in self.choices:
            raise ValueError(
                f"option {name} from {origin} must be one of {', '.join(self.choices)}, got {value!r}"
            )
        return parsed


COMMON_OPTIONS: dict[str, Option] = {
    "max_attempts": Option("int", 5, "attempts per request/transfer for transient errors", 1),
    "base_delay": Option("float", 0.5, "first retry backoff in seconds (doubles, full jitter)", 0),
    "max_delay": Option("float", 20.0, "longest retry backoff in seconds", 0),
    "staging_dir": Option(
        "str", None, "local folder for handoff files (default: <tempdir>/covalent-lot)"
    ),
    "cache_limit": Option(
        "size", 10 * 2**30,
        "most bytes of verified local copies kept in staging_dir; beyond it the least recently "
        "used ones that no electron holds are removed after each transfer", 0,
    ),
    "verify": Option("bool", True, "store a checksum with every upload and verify every download"),
    "checksum": Option(
        "str", CHECKSUM_DEFAULT,
        "what uploads store: crc32c (fast, checked per range as a download arrives) or sha256 "
        "(what sha256sum prints); objects stored with either are verified whatever this says",
        choices=CHECKSUM_ALGORITHMS,
    ),
    "max_files": Option("int", 8, "files moved at once in a folder transfer", 1),
    "reuse_local": Option(
        "bool", True,
        "skip a download when the local file already holds the stored checksum's bytes (recorded "
        "when this machine uploaded or verified it, unchanged since)",
    ),
    "fsync": Option(
        "bool", False,
        "also flush each downloaded file to disk before renaming it into place (survives a power "
        "loss; ~0.4 s per GiB here). Without it the rename is still atomic for readers and crashes",
    ),
}


# Keys of [lot] that belong to no backend: read where they are used.
LOT_ONLY_KEYS = {
    "offload_to": "folder URI @lot.offload stores values below when it is given no to= "
                  "(env COVALENT_LOT_OFFLOAD_TO)",
}


class Settings(Mapping[str, Any]):
    """Resolved option values, plus where each came from (for messages and doctor)."""

    def __init__(self, section: str, values: dict[str, Any], sources: dict[str, str],
                 store: str | None = None):
        self.section = section
        self._values = values
        self.sources = sources
        self.store = store  # the named store these values were resolved for, or None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, origin: str, **values: Any) -> "Settings":
        """These settings with ``values`` set (their source: ``origin``)."""
        return Settings(self.section, {**self._values, **values},
                        {**self.sources, **dict.fromkeys(values, origin)}, self.store)

    def __repr__(self) -> str:
        store = f", store={self.store!r}" if self.store is not None else ""
        return f"Settings({self.section!r}, {self._values!r}{store})"


def _suggest(name: str, known) -> str:
    """'; did you mean X?', or the known names when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known names: {', '.join(sorted(known))}"


def _conf_lot() -> dict:
    from . import _covalent

    return _covalent.read_conf_section("lot")


def _check_conf(section: str, conf: Any, all_specs: Mapping[str, Option]) -> Mapping[str, Any]:
    """Validate ``[lot]`` and ``[lot.<section>]`` (with its stores); return the latter."""
    if not isinstance(conf, Mapping):
        raise ValueError(f"covalent.conf: [lot] must be a table, got {conf!r}")
    section_conf = conf.get(section, {})
    if not isinstance(section_conf, Mapping):
        raise ValueError(f"covalent.conf: [lot.{section}] must be a table, got {section_conf!r}")
    for name, value in conf.items():
        if isinstance(value, Mapping) and name in BACKEND_SECTIONS:
            continue
        if name == STORES:
            raise ValueError(f"covalent.conf: stores belong to one backend: write "
                             f"[lot.{section}.stores.<name>] (or another backend's), "
                             f"not [lot.stores]")
        if isinstance(value, Mapping):  # a table: a backend section, mistyped
            raise ValueError(f"covalent.conf: unknown key {name!r} in [lot] (section "
                             f"[lot.{name}]){_suggest(name, BACKEND_SECTIONS)}")
        if name not in COMMON_OPTIONS and name not in LOT_ONLY_KEYS:
            hint = _suggest(name, list(COMMON_OPTIONS) + list(LOT_ONLY_KEYS) + list(BACKEND_SECTIONS))
            raise ValueError(f"covalent.conf: unknown key {name!r} in [lot]{hint}")
    for name in section_conf:
        if name == STORE:
            raise ValueError(
                f"covalent.conf: {STORE!r} is not a key of [lot.{section}], whose options are "
                f"the defaults of every store; choose a store with {STORE}=\"<name>\" or "
                f"COVALENT_LOT_{section.upper()}_STORE=<name>"
            )
        if name not in all_specs and name != STORES:
            hint = _suggest(name, [*all_specs, STORES])
            raise ValueError(f"covalent.conf: unknown key {name!r} in [lot.{section}]{hint}")
    for store, table in _stores(section, section_conf).items():
        for name in table:
            if name not in all_specs:
                raise ValueError(f"covalent.conf: unknown key {name!r} in "
                                 f"[lot.{section}.stores.{store}]{_suggest(name, all_specs)}")
    return section_conf


def _stores(section: str, section_conf: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """``[lot.<section>.stores]``: a table of tables, one per store name."""
    stores = section_conf.get(STORES, {})
    shape = (f"[lot.{section}.stores] must hold one table per store, e.g. "
             f"[lot.{section}.stores.<name>] with options in it")
    if not isinstance(stores, Mapping):
        raise ValueError(f"covalent.conf: {shape}; got {stores!r}")
    for store, table in stores.items():
        if not isinstance(table, Mapping):
            raise ValueError(f"covalent.conf: {shape}; got {store} = {table!r}")
    return stores


def _chosen_store(section: str, explicit: Mapping[str, Any], environ: Mapping[str, str],
                  section_conf: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """The store named by the argument, else by the environment, and its table."""
    variable = f"COVALENT_LOT_{section.upper()}_STORE"
    if explicit.get(STORE) is not None:
        name, origin = explicit[STORE], f"the {STORE}= argument"
    elif environ.get(variable):
        name, origin = environ[variable], f"environment {variable}"
    else:
        return None, {}
    if not isinstance(name, str):
        raise TypeError(f"{STORE} (from {origin}) must be a store name (str), got {name!r}")
    stores = _stores(section, section_conf)
    if name in stores:
        return name, stores[name]
    if stores:
        known = f"the stores of [lot.{section}] are {', '.join(sorted(stores))}"
        close = difflib.get_close_matches(name, list(stores), n=1)
        known += f" (did you mean {close[0]!r}?)" if close else ""
    else:
        known = f"no store is defined for {section}"
    raise ValueError(
        f"unknown store {name!r} (from {origin}): {known}; define it in covalent.conf as a "
        f"[lot.{section}.stores.{name}] table holding its options"
    )


def resolve(
    section: str,
    specs: Mapping[str, Option],
    explicit: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    conf: Mapping[str, Any] | None = None,
    owner: str = "strategy",
) -> Settings:
    """Resolve ``specs`` (backend options) plus the common options for ``section``.

    ``explicit`` may also hold ``store``, the name of a store of this section.
    """
    environ = os.environ if environ is None else environ
    conf = _conf_lot() if conf is None else conf
    all_specs = {**COMMON_OPTIONS, **specs}

    for name in explicit:
        if name not in all_specs and name != STORE:
            hint = _suggest(name, [*all_specs, STORE])
            raise TypeError(f"{owner} got an unexpected option {name!r}{hint}")

    section_conf = _check_conf(section, conf, all_specs)
    store, store_conf = _chosen_store(section, explicit, environ, section_conf)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, spec in all_specs.items():
        env_names = [f"COVALENT_LOT_{section.upper()}_{name.upper()}"]
        if name in COMMON_OPTIONS:
            env_names.append(f"COVALENT_LOT_{name.upper()}")
        candidates = [("argument", explicit.get(name))]
        candidates += [(f"environment {e}", environ.get(e)) for e in env_names]
        if store is not None:
            candidates.append((f"covalent.conf [lot.{section}.stores.{store}]", store_conf.get(name)))
        candidates.append((f"covalent.conf [lot.{section}]", section_conf.get(name)))
        if name in COMMON_OPTIONS:
            candidates.append(("covalent.conf [lot]", conf.get(name)))
        for origin, raw in candidates:
            if raw is not None and not (origin.startswith("environment") and raw == ""):
                values[name] = spec.coerce(name, raw, origin)
                sources[name] = origin
                break
        else:
            values[name] = spec.default
            sources[name] = "default"
    return Settings(section, values, sources, store)
