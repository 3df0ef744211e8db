"""``LotStrategy``: the Covalent ``FileTransferStrategy`` every backend shares.

A strategy is built on the client (from arguments, environment and
covalent.conf, validated there). ``upload``/``download``/``cp`` return small
callables that Covalent cloudpickles and runs on the executor; they carry only
plain values (URIs, paths, the strategy's class and the options given in code)
and resolve everything else where they run: that machine's environment and
covalent.conf, its staging folder, the SDK client and so its credentials.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable, ClassVar, Mapping

from . import _cache, _covalent, _portable
from ._config import Option, Settings, resolve
from ._covalent import FileTransferStrategy, FtCallDepReturnValue, original_path, resolve_template
from ._backend import RemoteObject
from ._engine import Engine, TransferStats
from ._logs import log_to_stderr_if_unconfigured, redact_sdk_logs
from ._retry import RetryPolicy
from ._uri import STAGING, StoreURI, check_template, parse_uri

STAGING_PREFIX = "{" + STAGING + "}/"

# When set, names a file that every TransferCall appends one JSON line of timings to
# (bench/e2e.py reads them; see PhaseClock).
TIMINGS_ENV = "COVALENT_LOT_TIMINGS"

__all__ = [
    "LotStrategy", "strategy_for", "STRATEGIES", "require_sdk", "build_engine", "settings_here",
    "staging_dir", "staging_dirs_here", "keep_bounded", "resolve_paths", "run_transfer", "TransferCall", "PreTransferHook", "Portable",
]

# scheme -> "module:Class"; modules are imported only when a scheme is used.
STRATEGIES: dict[str, str] = {
    "s3": "covalent_lot.strategies.s3:S3Strategy",
    "gs": "covalent_lot.strategies.gcs:GCSStrategy",
    "az": "covalent_lot.strategies.azure:AzureStrategy",
    "sftp": "covalent_lot.strategies.sftp:SFTPStrategy",
}


def key_too_long(location: StoreURI, service: str, limit: int, unit: str = "bytes of UTF-8") -> ValueError:
    """The error for a key longer than the service allows (the key shown cut short)."""
    key = location.key
    length = len(key.encode("utf-8")) if unit.startswith("bytes") else len(key)
    shown = f"{key[:60]!r}... ({length} {unit.split()[0]})"
    return ValueError(
        f"{service} names are at most {limit} {unit}; the key {shown} in "
        f"{location.scheme}://{location.bucket}/ is longer: shorten it"
    )


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def strategy_for(uri_or_scheme: str, **options: Any) -> "LotStrategy":
    """A strategy for the scheme of ``uri_or_scheme``, built from ``options`` + config."""
    scheme = uri_or_scheme.split("://", 1)[0].lower()
    if scheme not in STRATEGIES:
        raise ValueError(
            f"no covalent-lot strategy for scheme {scheme!r} (from {uri_or_scheme!r}); "
            f"supported: {', '.join(sorted(STRATEGIES))}"
        )
    return _load(STRATEGIES[scheme])(**options)


def require_sdk(module: str, extra: str) -> None:
    """Import check with the install line, and where to run it, in the message."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {extra} backend of covalent-lot needs the {module} module: pip install "
            f"covalent-lot[{extra}] in the Python that runs it ({sys.executable} on "
            f"{socket.gethostname()})"
        ) from exc


def build_engine(backend_path: str, settings: Mapping[str, Any],
                 progress: Callable[[int], None] | None = None) -> Engine:
    redact_sdk_logs()  # before the SDK's first request
    backend = _load(backend_path)(settings)
    policy = RetryPolicy.from_settings(settings)
    return Engine(backend, policy, verify=settings["verify"], progress=progress)


def settings_here(strategy: str, options: Mapping[str, Any]) -> Settings:
    """The settings of a transfer, resolved in the process that runs it.

    ``options`` are the ones given in code (they travel with the workflow); the
    rest, credentials included, come from this machine's environment and
    covalent.conf, never from the dispatcher's.
    """
    cls = _load(strategy)
    require_sdk(cls.sdk_module, cls.extra)
    return resolve(cls.section, cls.options, options, owner=f"{cls.__name__}()")


def staging_dir(settings: Mapping[str, Any]) -> str:
    """The staging folder of ``settings``: ``staging_dir``, else <tempdir>/covalent-lot."""
    return settings["staging_dir"] or os.path.join(tempfile.gettempdir(), "covalent-lot")


def staging_dirs_here() -> list[str]:
    """The staging folders this machine's settings name, one per distinct folder
    (``staging_dir`` may differ between backends)."""
    from ._config import BACKEND_SECTIONS

    found: list[str] = []
    for scheme, path in STRATEGIES.items():
        cls = _load(path)
        if cls.section not in BACKEND_SECTIONS:
            continue
        folder = staging_dir(resolve(cls.section, cls.options, {}))
        if folder not in found:
            found.append(folder)
    return found


def resolve_paths(settings: Mapping[str, Any], *texts: str) -> list[str]:
    """``texts`` with their placeholders filled for the task running now, ``{staging}``
    from ``settings``."""
    return [resolve_template(text, lambda: staging_dir(settings)) for text in texts]


def run_transfer(action: str, backend_path: str, settings: Mapping[str, Any], source: str,
                 destination: str, progress: Callable[[int], None] | None = None, *,
                 clock: "PhaseClock | None" = None) -> Any:
    """Fill the placeholders of ``source``/``destination`` and run ``action`` (upload,
    download, copy, list, delete) with a fresh engine. ``clock``: a :class:`PhaseClock`
    that gets the laps "build" (engine and backend construction) and "close"."""
    if clock is None:
        clock = NO_CLOCK
    source, destination = resolve_paths(settings, source, destination)
    with log_to_stderr_if_unconfigured():
        clock.lap("resolve")
        engine = build_engine(backend_path, settings, progress)
        clock.lap("build")
        try:
            if action == "upload":
                return engine.upload(source, parse_uri(destination))
            if action == "download":
                return engine.download(parse_uri(source), destination)
            if action == "list":
                return engine.ls(parse_uri(source))
            if action == "delete":
                return engine.delete(parse_uri(source))
            return engine.copy(parse_uri(source), parse_uri(destination))
        finally:
            clock.lap("engine")
            engine.backend.close()
            clock.lap("close")


def keep_bounded(settings: Mapping[str, Any], local: str, hold: bool = False) -> None:
    """After a transfer that left ``local`` in the staging folder: trim the folder to
    ``cache_limit`` (see _cache). ``hold``: keep ``local`` (a file, or the files of a
    folder) from eviction until this process ends, for the electron that reads it."""
    root = os.path.abspath(staging_dir(settings))
    if not os.path.abspath(local).startswith(root + os.sep):
        return
    if hold:
        paths = [local] if not local.endswith("/") else [
            os.path.join(folder, name) for folder, _dirs, names in os.walk(local) for name in names
        ]
        for path in paths:
            _cache.hold_until_exit(path)
    try:
        _cache.trim(root, settings["cache_limit"])
    except OSError as exc:  # tidying up must not fail the transfer it follows
        _cache.log.warning("could not trim the local cache %s: %s", root, exc)


class PhaseClock:
    """Wall time per phase of one :class:`TransferCall`, for ``COVALENT_LOT_TIMINGS``.

    ``lap(name)`` adds the time since the previous lap to ``name``. ``write`` appends
    one JSON line: action, source and destination (placeholders filled where
    possible), dispatch and node, ``start``/``end`` (``time.time()``), ``phases``
    (seconds: load = strategy, backend and SDK imports, most often cached; settings;
    resolve; build = engine and backend construction; engine = the engine's call;
    close; keep_bounded), ``engine_phases`` (``TransferStats.phases`` where the
    engine reports them), bytes, files, kept and the error, if any.
    """

    def __init__(self) -> None:
        self.start = time.time()
        self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def write(self, path: str, call: "TransferCall", stats: Any, error: str | None) -> None:
        """Append the line; never raises (timings must not fail the transfer they time)."""
        try:
            record = {
                "action": call.action, "source": call.source, "destination": call.destination,
                "start": self.start, "end": time.time(), "pid": os.getpid(),
                "phases": {name: round(seconds, 6) for name, seconds in self.phases.items()},
                "engine_phases": dict(getattr(stats, "phases", None) or {}),
                "error": error,
            }
            try:
                context = _covalent.run_context() or {}
            except Exception:  # noqa: BLE001 - outside an electron, or covalent's context moved
                context = {}
            record.update({key: str(value) for key, value in context.items()})
            try:
                record["source"], record["destination"] = resolve_paths(
                    settings_here(call.strategy, call.options), call.source, call.destination)
            except Exception:  # noqa: BLE001 - the templates as given, then
                pass
            for field in ("bytes", "files", "kept", "seconds", "retries"):
                if hasattr(stats, field):
                    record["engine_seconds" if field == "seconds" else field] = getattr(stats, field)
            line = json.dumps(record, default=str) + "\n"
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)  # one write of one line: O_APPEND keeps concurrent writers' lines whole
        except (OSError, TypeError, ValueError):
            pass


class _NoClock:
    """PhaseClock's stand-in when no timings are asked for: costs a method call."""

    def lap(self, name: str) -> None:
        pass


NO_CLOCK: Any = _NoClock()


class Portable:
    """Pickles as plain values that rebuild the object on the executor (see _portable)."""

    extra = "all"  # the pip extra named when covalent-lot is missing there

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # mutable values

    def __reduce__(self):
        cls = type(self)
        return (_portable.rebuild, (cls.__module__, cls.__qualname__, dict(self.__dict__), self.extra))


@dataclasses.dataclass(eq=False, repr=False)  # equality is Portable's: the same plain values
class TransferCall(Portable):
    """What Covalent pickles and runs on the executor for one file transfer.

    It carries the strategy's class ("module:Class") and the options given in
    code; everything else is resolved where it runs (:func:`settings_here`).
    """

    action: str
    strategy: str  # "module:Class"
    options: dict
    source: str
    destination: str
    extra: str = "all"

    def settings(self) -> Settings:
        return settings_here(self.strategy, self.options)

    def __call__(self, progress: Callable[[int], None] | None = None) -> Any:
        """Run it (Covalent calls it with no arguments); ``progress(nbytes)`` as bytes move.

        With ``COVALENT_LOT_TIMINGS`` naming a file, one JSON line of this call's
        timings is appended to it (:class:`PhaseClock`)."""
        path = os.environ.get(TIMINGS_ENV)
        clock = PhaseClock() if path else NO_CLOCK
        stats: Any = None
        error: str | None = None
        try:
            cls = _load(self.strategy)  # the strategy's module, its backend's and the SDK
            require_sdk(cls.sdk_module, cls.extra)
            _load(cls.backend_path)
            clock.lap("load")
            settings = self.settings()
            clock.lap("settings")
            stats = run_transfer(self.action, cls.backend_path, settings, self.source, self.destination,
                                 progress, clock=clock)
            if self.action in ("upload", "download"):
                local = resolve_paths(settings, self.source if self.action == "upload" else self.destination)[0]
                keep_bounded(settings, local, hold=self.action == "download")
                clock.lap("keep_bounded")
            return stats
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if path:
                clock.write(path, self, stats, error)

    def __repr__(self) -> str:
        return f"<covalent-lot {self.action} {self.source} -> {self.destination}>"


class PreTransferHook(Portable):
    """Runs before the electron: checks the backend can run here, resolves paths,
    makes the local folder, returns them. A transfer that cannot run on this
    executor fails here, before the electron and before any byte moves."""

    def __init__(self, call: TransferCall, local: str, folder: bool, returns: str):
        self.call = call
        self.local = local  # "source" or "destination": the local side
        self.folder = folder
        self.returns = returns
        self.extra = call.extra

    def __call__(self):
        source, destination = resolve_paths(self.call.settings(), self.call.source, self.call.destination)
        local = source if self.local == "source" else destination
        os.makedirs(local if self.folder else os.path.dirname(os.path.abspath(local)), exist_ok=True)
        if self.returns == FtCallDepReturnValue.TO.value:
            return destination
        if self.returns == FtCallDepReturnValue.FROM.value:
            return source
        return (source, destination)


class LotStrategy(FileTransferStrategy):
    """Base of covalent-lot's strategies; subclasses name their backend and options."""

    scheme: ClassVar[str]
    section: ClassVar[str]  # covalent.conf section below [lot]
    extra: ClassVar[str]  # pip extra
    sdk_module: ClassVar[str]
    backend_path: ClassVar[str]  # "module:Class" of the Backend, imported on the executor
    options: ClassVar[dict[str, Option]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "scheme" in cls.__dict__:
            # So that Covalent's own File("az://...") and FileTransfer(..., strategy=
            # AzureStrategy()) accept the scheme without lot.register().
            _covalent.register_remote_scheme(cls.scheme)

    def __init__(self, **options: Any):
        require_sdk(self.sdk_module, self.extra)
        self.settings: Settings = resolve(
            self.section, self.options, options, owner=f"{type(self).__name__}()"
        )
        # What travels to the executor: the options given here, not the ones this
        # machine's environment and covalent.conf supplied (see settings_here).
        self.explicit = {name: value for name, value in options.items() if value is not None}
        _covalent.register_remote_scheme(self.scheme)

    @classmethod
    def class_path(cls) -> str:
        """``"module:Class"``, how the executor finds this class again."""
        return f"{cls.__module__}:{cls.__name__}"

    def settings_here(self) -> Settings:
        """This strategy's settings as the process calling it resolves them: the
        options given in code, then this machine's environment and covalent.conf."""
        return settings_here(self.class_path(), self.explicit)

    # --- validation on the client -----------------------------------------------------
    # The service's naming rules, as data: what its buckets and objects are called,
    # the longest key (None: no limit here) and whether the limit counts UTF-8
    # bytes or characters.
    bucket_noun: ClassVar[str] = "bucket"
    object_noun: ClassVar[str] = "object"
    max_key: ClassVar[int | None] = None
    key_unit: ClassVar[str] = "bytes of UTF-8"

    @staticmethod
    def bucket_problem(bucket: str) -> str | None:
        """Why ``bucket`` breaks the service's naming rules, or None."""
        return None

    def check_location(self, location: StoreURI) -> None:
        """The service's rules for bucket names and keys; raise ValueError. Extend for more."""
        problem = self.bucket_problem(location.bucket)
        if problem:
            raise ValueError(f"invalid {self.bucket_noun} name {location.bucket!r} in {location}: {problem}")
        key = location.key
        length = len(key.encode("utf-8")) if self.key_unit.startswith("bytes") else len(key)
        if self.max_key is not None and length > self.max_key:
            raise key_too_long(location, self.object_noun, self.max_key, self.key_unit)

    def parse(self, uri: str) -> StoreURI:
        location = parse_uri(uri, schemes=(self.scheme,))
        self.check_location(location)
        return location

    def _local(self, file, what: str) -> str:
        path = original_path(file, remote=False)
        check_template(path, what, local=True)
        if not (os.path.isabs(path) or path.startswith(STAGING_PREFIX)):
            raise ValueError(
                f"{what} {path!r} must be absolute: electrons run in another working directory"
            )
        return path

    def _call(self, action: str, source: str, destination: str) -> TransferCall:
        return TransferCall(action, self.class_path(), dict(self.explicit), source, destination, self.extra)

    # --- Covalent's FileTransferStrategy interface ------------------------------------
    def upload(self, from_file, to_file) -> TransferCall:
        destination = original_path(to_file, remote=True)
        self.parse(destination)
        return self._call("upload", self._local(from_file, "upload source"), destination)

    def download(self, from_file, to_file) -> TransferCall:
        source = original_path(from_file, remote=True)
        self.parse(source)
        return self._call("download", source, self._local(to_file, "download destination"))

    def cp(self, from_file, to_file) -> TransferCall:
        source = original_path(from_file, remote=True)
        destination = original_path(to_file, remote=True)
        if not (from_file.is_remote and to_file.is_remote):
            raise ValueError(
                f"{type(self).__name__}.cp copies between two {self.scheme}:// URIs "
                f"(server side); got {source!r} -> {destination!r}"
            )
        self.parse(source)
        self.parse(destination)
        return self._call("copy", source, destination)

    def pre_transfer_hook(self, from_file, to_file, return_value_type=FtCallDepReturnValue.FROM_TO):
        local_is_source = not from_file.is_remote
        local_file = from_file if local_is_source else to_file
        remote_file = to_file if local_is_source else from_file
        local = original_path(local_file, remote=False)
        remote = original_path(remote_file, remote=True)
        folder = remote.endswith("/") or local.endswith("/")
        source, destination = (local, remote) if local_is_source else (remote, local)
        return PreTransferHook(
            self._call("check", source, destination), "source" if local_is_source else "destination",
            folder, FtCallDepReturnValue(return_value_type).value,
        )

    # --- direct use, outside a workflow -----------------------------------------------
    # These run in this process with this strategy's settings, as resolved here.
    def _run(self, action: str, source: str, destination: str,
             progress: Callable[[int], None] | None = None) -> Any:
        return run_transfer(action, self.backend_path, self.settings, source, destination, progress)

    # ``progress(nbytes)`` is called as bytes move, from any thread (a progress bar).
    def put(self, local_path: str, uri: str, *, progress: Callable[[int], None] | None = None) -> TransferStats:
        """Upload now, in this process."""
        self.parse(uri)
        return self._run("upload", os.fspath(local_path), uri, progress)

    def get(self, uri: str, local_path: str, *, progress: Callable[[int], None] | None = None) -> TransferStats:
        """Download now, in this process."""
        self.parse(uri)
        return self._run("download", uri, os.fspath(local_path), progress)

    def copy(self, source_uri: str, destination_uri: str, *,
             progress: Callable[[int], None] | None = None) -> TransferStats:
        """Server-side copy now."""
        self.parse(source_uri)
        self.parse(destination_uri)
        return self._run("copy", source_uri, destination_uri, progress)

    def ls(self, uri: str) -> list[RemoteObject]:
        """The objects below a folder URI (recursively), or the one object ``uri`` names."""
        self.parse(uri)
        return self._run("list", uri, "")

    def rm(self, uri: str) -> TransferStats:
        """Remove one object, or every object below a folder URI (ending in '/')."""
        self.parse(uri)
        return self._run("delete", uri, "")

    def __repr__(self) -> str:
        shown = [f"{k}={v!r}" for k, v in self.settings.items() if self.settings.sources[k] != "default"]
        if self.settings.store is not None:
            shown.insert(0, f"store={self.settings.store!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


def register(*schemes: str) -> None:
    """Route Covalent's own ``FileTransfer("<scheme>://…")`` to covalent-lot.

    Without arguments, every scheme covalent-lot has. Note that this replaces
    Covalent's built-in strategy for ``s3``/``gs`` in this process.
    """
    for scheme in schemes or tuple(STRATEGIES):
        if scheme not in STRATEGIES:
            raise ValueError(f"no covalent-lot strategy for scheme {scheme!r}")
        _covalent.register_scheme(scheme, _load(STRATEGIES[scheme]))
