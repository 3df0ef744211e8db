"""``covalent-lot doctor``: what each backend would use, and whether it works.

Per backend: the effective settings and where each value came from (argument,
environment, covalent.conf, default), secrets masked; whether its SDK extra is
installed; whether credentials resolve (the SDK client is built exactly as a
transfer builds it); and, for each STORE URI given, a tiny write/read/delete
round trip through the engine. Every problem becomes one ``PROBLEM <backend>:``
line on stderr and exit status 1.

Without STORE every backend is looked at, but a credential failure counts as a
problem only for a backend that is configured (an option, a store or a
covalent.conf section of its own): the SDKs of unused backends are often
installed, and their missing credentials are no one's problem.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import secrets
import sys
import tempfile
import time
from typing import Any

from ._cli_shared import human_size, open_strategy

__all__ = ["doctor", "is_secret", "masked", "shown_value", "Checkup"]

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas", "connection_string")
NOT_SECRET = ("key_filename", "credentials_file")  # paths to files, not their contents
MASK = "******** (masked)"
PROBE_BYTES = 1024
PROBE_PREFIX = ".covalent-lot-doctor-"
ROUND_TRIP_ATTEMPTS = 2
NOTE_CHARS = 100  # an unconfigured backend's credential error, cut short (a STORE shows it all)  # a store that does not answer should not keep doctor waiting


def is_secret(name: str) -> bool:
    """Whether an option's value must not be shown (``*_env`` options hold variable NAMES)."""
    name = name.lower()
    if name.endswith("_env") or name in NOT_SECRET:
        return False
    return any(word in name for word in SECRET_WORDS)


def masked(name: str, value: Any) -> Any:
    """``value``, or MASK for a string of a secret-sounding option (a bool or number hides nothing)."""
    return MASK if isinstance(value, str) and value and is_secret(name) else value


def shown_value(name: str, value: Any) -> str:
    """The value as doctor prints it."""
    value = masked(name, value)
    return "-" if value is None else str(value)


class Checkup:
    """Findings of one doctor run: report lines, PROBLEM lines and the JSON record."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.record: dict[str, Any] = {"backends": {}, "problems": self.problems}

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"  {label:<12} {text}")

    def problem(self, backend: str, text: str) -> None:
        self.problems.append(f"PROBLEM {backend}: {text}")


class ProbeFailed(Exception):
    """A step of the round trip failed; the message names the step and the error."""


def _error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return message if isinstance(exc, ProbeFailed) else f"{type(exc).__name__}: {message}"


def _conf_path() -> str:
    try:
        from ._covalent import conf_file_path  # on use: importing Covalent writes its config files

        return conf_file_path()
    except Exception:  # noqa: BLE001 - only shown
        return "(unknown)"


def _sdk_version(module: str) -> str:
    imported = importlib.import_module(module)
    version = getattr(imported, "__version__", None) or getattr(imported, "VERSION", None)
    return f"{module} {version}" if version else f"{module} (installed)"


def _conf_section(section: str) -> dict:
    from ._covalent import read_conf_section

    lot = read_conf_section("lot")
    table = lot.get(section, {}) if isinstance(lot, dict) else {}
    return table if isinstance(table, dict) else {}


def _settings_lines(checkup: Checkup, strategy, show_all: bool) -> dict[str, Any]:
    settings = strategy.settings
    record = {name: {"value": masked(name, settings[name]), "source": settings.sources[name]}
              for name in settings}
    shown = [name for name in settings if show_all or settings.sources[name] != "default"]
    width = max((len(name) for name in shown), default=0)
    values = {name: shown_value(name, settings[name]) for name in shown}
    vwidth = max((len(v) for v in values.values()), default=0)
    label = "settings"
    for name in shown:
        checkup.add(label, f"{name:<{width}} = {values[name]:<{vwidth}}  ({settings.sources[name]})")
        label = ""
    hidden = len(settings) - len(shown)
    if hidden:
        more = "all" if hidden == len(settings) else f"{hidden} more"
        checkup.add(label, f"{more} at their defaults (--all shows them)")
    return record


def _check_credentials(strategy) -> str:
    """Build the backend and its SDK client as a transfer would; the endpoint it talks to."""
    from ._errors import translate
    from ._strategy import build_engine

    backend = build_engine(strategy.backend_path, strategy.settings.as_dict()).backend
    try:
        try:
            backend.check_credentials()
        except Exception as exc:  # in the words of the error table, as a transfer would say it
            verdict = backend.classify(exc)
            if verdict is None:
                raise
            raise translate(verdict, action="connect to", target=f"{strategy.scheme}://",
                            endpoint=backend.endpoint) from exc
        return backend.endpoint
    finally:
        backend.close()


def round_trip(strategy, uri: str) -> str:
    """Write, read back, compare and delete a small probe object below ``uri``."""
    folder = uri if uri.endswith("/") else uri + "/"
    probe = f"{folder}{PROBE_PREFIX}{secrets.token_hex(6)}"
    data = os.urandom(PROBE_BYTES)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="covalent-lot-doctor-") as tmp:
        sent, received = os.path.join(tmp, "sent"), os.path.join(tmp, "received")
        with open(sent, "wb") as f:
            f.write(data)
        step = "write"
        try:
            strategy.put(sent, probe)
            step = "read"
            strategy.get(probe, received)
            with open(received, "rb") as f:
                if f.read() != data:
                    raise OSError(f"{probe} read back other bytes than were written")
            step = "delete"
            strategy.rm(probe)
        except Exception as exc:
            if step == "read":  # written but not read back: remove it anyway, best effort
                with contextlib.suppress(Exception):
                    strategy.rm(probe)
            raise ProbeFailed(f"{step} failed: {_error(exc)}") from exc
    return f"wrote, read back and removed {human_size(PROBE_BYTES)} in {time.perf_counter() - started:.2f} s"


def _configured(strategy, conf: dict) -> bool:
    """Whether the user set anything for this backend (else its credentials are no one's problem)."""
    settings = strategy.settings
    return (settings.store is not None or bool(conf)
            or any(settings.sources[name] != "default" for name in strategy.options))


def _credentials_line(checkup: Checkup, strategy, name: str, uris: list[str], conf: dict) -> str:
    from ._strategy import _load

    if _load(strategy.backend_path).credentials_per_host:
        checkup.add("credentials", f"checked per host: give a {strategy.scheme}:// STORE to connect"
                    if not uris else "checked by the round trip below")
        return "per host"
    try:
        endpoint = _check_credentials(strategy)
    except Exception as exc:
        if uris or _configured(strategy, conf):
            checkup.add("credentials", _error(exc))
            checkup.problem(name, f"credentials: {_error(exc)}")
        else:
            text = _error(exc)
            short = text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS] + "..."
            checkup.add("credentials", f"not configured, not a problem: {short}")
        return _error(exc)
    checkup.add("credentials", f"ok: client built for {endpoint}")
    return "ok"


def _known_options(cls) -> set[str]:
    from ._config import COMMON_OPTIONS

    return {*COMMON_OPTIONS, *cls.options}


def _own_options(args: argparse.Namespace, cls) -> argparse.Namespace:
    """``args`` with only the ``-o`` options this backend has (-o endpoint_url=... means S3)."""
    known = _known_options(cls)
    return argparse.Namespace(**{**vars(args), "option": [o for o in args.option or () if o[0] in known]})


def check_backend(checkup: Checkup, scheme: str, uris: list[str], args: argparse.Namespace) -> None:
    """SDK, settings, credentials and the round trip to each of ``uris``, for one backend."""
    from ._strategy import STRATEGIES, _load

    cls = _load(STRATEGIES[scheme])
    name = cls.section
    args = _own_options(args, cls)
    record: dict[str, Any] = {"strategy": STRATEGIES[scheme], "sdk": None, "stores": {}}
    checkup.record["backends"][name] = record
    checkup.lines.append(f"{name}  ({scheme}://, {cls.__name__})")
    try:
        record["sdk"] = _sdk_version(cls.sdk_module)
    except ImportError:
        line = f"{cls.sdk_module} not installed: pip install 'covalent-lot[{cls.extra}]'"
        checkup.add("sdk", line)
        if uris:
            checkup.problem(name, line)
        return
    checkup.add("sdk", record["sdk"])

    conf = _conf_section(name)
    defined = sorted(conf.get("stores", {}))
    overrides: dict[str, Any] = {}
    if args.store is not None and not uris and args.store not in defined:
        overrides["store"] = None  # --store names another backend's store: show this one's defaults
    try:
        strategy = open_strategy(args, f"{scheme}://", **overrides)
    except Exception as exc:  # covalent.conf, environment or -o values
        checkup.add("settings", _error(exc))
        checkup.problem(name, f"settings: {_error(exc)}")
        return
    record["settings"] = _settings_lines(checkup, strategy, args.all)
    if defined:
        using = f"; showing {strategy.settings.store}" if strategy.settings.store else ""
        checkup.add("stores", f"{', '.join(defined)} (choose with --store NAME{using})")
    record["credentials"] = _credentials_line(checkup, strategy, name, uris, conf)

    attempts = min(ROUND_TRIP_ATTEMPTS, strategy.settings["max_attempts"])
    for uri in uris:
        try:
            detail = round_trip(open_strategy(args, uri, max_attempts=attempts, **overrides), uri)
        except Exception as exc:
            record["stores"][uri] = _error(exc)
            checkup.add("store", f"{uri}: {_error(exc)}")
            checkup.problem(name, f"store {uri}: {_error(exc)}")
            continue
        record["stores"][uri] = "ok"
        checkup.add("store", f"{uri}: ok, {detail}")


def doctor(args: argparse.Namespace) -> int:
    from . import __version__
    from ._strategy import STRATEGIES, _load

    checkup = Checkup()
    conf = _conf_path()
    checkup.record.update(version=__version__, covalent_conf=conf)
    checkup.lines.append(f"covalent-lot {__version__}, covalent.conf: {conf}")
    by_scheme: dict[str, list[str]] = {}
    for uri in args.stores:
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in STRATEGIES:
            checkup.problem("doctor", f"{uri!r} is not a store URI of a covalent-lot backend "
                            f"(schemes: {', '.join(f'{s}://' for s in STRATEGIES)})")
            continue
        by_scheme.setdefault(scheme, []).append(uri)
    schemes = list(by_scheme or ([] if args.stores else STRATEGIES))
    known = set().union(*(_known_options(_load(STRATEGIES[s])) for s in schemes)) if schemes else set()
    for option, _ in args.option or ():
        if option not in known:
            checkup.problem("doctor", f"-o {option}: no backend checked here has this option")
    for scheme in schemes:
        check_backend(checkup, scheme, by_scheme.get(scheme, []), args)

    if args.json:
        print(json.dumps(checkup.record, indent=2, default=str))
    elif not args.quiet:
        checkup.lines.append("all good" if not checkup.problems else f"{len(checkup.problems)} problem(s)")
        print("\n".join(checkup.lines))
    for line in checkup.problems:
        print(line, file=sys.stderr)
    return 1 if checkup.problems else 0
