"""``LotStrategy``: the Covalent ``FileTransferStrategy`` every backend shares.

A strategy is built on the client (from arguments, environment and
covalent.conf, validated there). ``upload``/``download``/``cp`` return small
callables that Covalent cloudpickles and runs on the executor; they carry only
plain, non-secret values (URIs, paths, resolved options) and build the SDK
client, and so resolve credentials, when they run.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, ClassVar, Mapping

from . import _covalent
from ._config import Option, Settings, resolve
from ._covalent import FileTransferStrategy, FtCallDepReturnValue, original_path, resolve_template
from ._engine import Engine, RemoteObject, TransferStats
from ._logs import log_to_stderr_if_unconfigured, redact_sdk_logs
from ._retry import RetryPolicy
from ._uri import StoreURI, check_template, parse_uri

__all__ = ["LotStrategy", "strategy_for", "STRATEGIES", "require_sdk", "build_engine"]

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
    """Import check with the install line in the message."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"the {extra} backend of covalent-lot needs the {module} module: "
            f"pip install covalent-lot[{extra}]"
        ) from exc


def build_engine(backend_path: str, settings: Mapping[str, Any],
                 progress: Callable[[int], None] | None = None) -> Engine:
    redact_sdk_logs()  # before the SDK's first request
    backend = _load(backend_path)(settings)
    policy = RetryPolicy(settings["max_attempts"], settings["base_delay"], settings["max_delay"])
    return Engine(backend, policy, verify=settings["verify"], progress=progress)


class TransferCall:
    """What Covalent pickles and runs on the executor for one file transfer."""

    def __init__(self, action: str, backend: str, settings: dict, source: str, destination: str):
        self.action = action
        self.backend = backend
        self.settings = settings
        self.source = source
        self.destination = destination

    def __call__(self, progress: Callable[[int], None] | None = None) -> Any:
        """Run it (Covalent calls it with no arguments); ``progress(nbytes)`` as bytes move."""
        source = resolve_template(self.source)
        destination = resolve_template(self.destination)
        with log_to_stderr_if_unconfigured():
            engine = build_engine(self.backend, self.settings, progress)
            try:
                if self.action == "upload":
                    return engine.upload(source, parse_uri(destination))
                if self.action == "download":
                    return engine.download(parse_uri(source), destination)
                if self.action == "list":
                    return engine.ls(parse_uri(source))
                if self.action == "delete":
                    return engine.delete(parse_uri(source))
                return engine.copy(parse_uri(source), parse_uri(destination))
            finally:
                engine.backend.close()

    def __repr__(self) -> str:
        return f"<covalent-lot {self.action} {self.source} -> {self.destination}>"


class PreTransferHook:
    """Runs before the electron: resolves paths, makes the local folder, returns them."""

    def __init__(self, source: str, destination: str, local: str, folder: bool, returns: str):
        self.source = source
        self.destination = destination
        self.local = local  # "source" or "destination": the local side
        self.folder = folder
        self.returns = returns

    def __call__(self):
        source = resolve_template(self.source)
        destination = resolve_template(self.destination)
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

    def __init__(self, **options: Any):
        require_sdk(self.sdk_module, self.extra)
        self.settings: Settings = resolve(
            self.section, self.options, options, owner=f"{type(self).__name__}()"
        )

    # --- validation on the client -----------------------------------------------------
    def check_location(self, location: StoreURI) -> None:
        """Backend rules for bucket names etc.; raise ValueError."""

    def parse(self, uri: str) -> StoreURI:
        location = parse_uri(uri, schemes=(self.scheme,))
        self.check_location(location)
        return location

    def _local(self, file, what: str) -> str:
        path = original_path(file, remote=False)
        check_template(path, what)
        if not os.path.isabs(path):
            raise ValueError(
                f"{what} {path!r} must be absolute: electrons run in another working directory"
            )
        return path

    def _call(self, action: str, source: str, destination: str) -> TransferCall:
        return TransferCall(action, self.backend_path, self.settings.as_dict(), source, destination)

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
            source, destination, "source" if local_is_source else "destination", folder,
            FtCallDepReturnValue(return_value_type).value,
        )

    # --- direct use, outside a workflow -----------------------------------------------
    # ``progress(nbytes)`` is called as bytes move, from any thread (a progress bar).
    def put(self, local_path: str, uri: str, *, progress: Callable[[int], None] | None = None) -> TransferStats:
        """Upload now, in this process."""
        self.parse(uri)
        return self._call("upload", os.fspath(local_path), uri)(progress)

    def get(self, uri: str, local_path: str, *, progress: Callable[[int], None] | None = None) -> TransferStats:
        """Download now, in this process."""
        self.parse(uri)
        return self._call("download", uri, os.fspath(local_path))(progress)

    def copy(self, source_uri: str, destination_uri: str, *,
             progress: Callable[[int], None] | None = None) -> TransferStats:
        """Server-side copy now."""
        self.parse(source_uri)
        self.parse(destination_uri)
        return self._call("copy", source_uri, destination_uri)(progress)

    def ls(self, uri: str) -> list[RemoteObject]:
        """The objects below a folder URI (recursively), or the one object ``uri`` names."""
        self.parse(uri)
        return self._call("list", uri, "")()

    def rm(self, uri: str) -> TransferStats:
        """Remove one object, or every object below a folder URI (ending in '/')."""
        self.parse(uri)
        return self._call("delete", uri, "")()

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
