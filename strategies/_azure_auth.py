"""The Azure account: its options and their checks (on the client), and the SDK
client with its credential and transfer settings (built on the executor).

Credentials are never options: the options name *environment variables* that
the executor reads when the transfer runs (a connection string, an account key
or a SAS token), or ask for ``DefaultAzureCredential`` from the optional
azure-identity package. Nothing secret is stored on the strategy, in its
settings or in what Covalent pickles.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit, urlunsplit

from covalent_lot._config import Option
from covalent_lot._errors import Classified, ErrorKind
from covalent_lot._retry import RetryPolicy

__all__ = ["ACCOUNT_OPTIONS", "AzureAccount", "check_account", "display_url", "account_url_of", "account_name_of",
           "first_line", "sdk_retry_policy"]

CREDENTIALS = ("auto", "connection_string", "account_key", "sas_token", "azure_identity", "anonymous")

ACCOUNT_OPTIONS: dict[str, Option] = {
    "account_url": Option(
        # "str", not "url": the check below never echoes a query (a pasted SAS).
        "str", None,
        "blob endpoint, e.g. http://127.0.0.1:10000/devstoreaccount1 "
        "(default: https://<account_name>.blob.core.windows.net)",
    ),
    "account_name": Option("str", None, "storage account name (builds account_url; names the key's account)"),
    "credential": Option(
        "str", "auto",
        "how the executor authenticates: auto tries the connection string, key and SAS "
        "variables in turn, then DefaultAzureCredential (azure-identity)",
        choices=CREDENTIALS,
    ),
    "connection_string_env": Option(
        "envname", "AZURE_STORAGE_CONNECTION_STRING",
        "name of the executor's environment variable holding a connection string",
    ),
    "account_key_env": Option(
        "envname", "AZURE_STORAGE_KEY", "name of the executor's environment variable holding an account key"
    ),
    "sas_token_env": Option(
        "envname", "AZURE_STORAGE_SAS_TOKEN", "name of the executor's environment variable holding a SAS token"
    ),
}

_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")


def display_url(url: str) -> str:
    """``url`` without query, fragment or user info: safe to show in messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def account_url_of(settings: Mapping[str, Any]) -> str | None:
    """The configured blob endpoint, or None (a connection string then brings it)."""
    if settings["account_url"] is not None:
        return settings["account_url"].rstrip("/")
    if settings["account_name"] is not None:
        return f"https://{settings['account_name']}.blob.core.windows.net"
    return None


def account_name_of(settings: Mapping[str, Any], url: str) -> str | None:
    """The account an account key belongs to: the option, else read from the URL."""
    if settings["account_name"] is not None:
        return settings["account_name"]
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ".blob.core." in host:
        return host.split(".", 1)[0]
    # Emulators and IP-style endpoints put the account first in the path.
    first = parts.path.strip("/").split("/", 1)[0]
    return first or None


def check_account(settings: Mapping[str, Any]) -> None:
    """Rules across the account options; ValueError naming the option, never echoing a secret."""
    url = settings["account_url"]
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"option account_url must be an http(s) URL such as "
                f"https://myaccount.blob.core.windows.net, got {display_url(url)!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"option account_url {display_url(url)!r} must not carry a query string or "
                f"user info: put a SAS token in the executor's ${settings['sas_token_env']} "
                "(option sas_token_env) instead"
            )
    name = settings["account_name"]
    if name is not None and not _ACCOUNT.match(name):
        raise ValueError(
            f"option account_name {name!r}: storage account names are 3-24 lowercase letters and digits"
        )
    mode = settings["credential"]
    if mode not in ("auto", "connection_string") and account_url_of(settings) is None:
        raise ValueError(
            f"credential={mode} needs the account: set account_url or account_name "
            "(covalent.conf [lot.azure], COVALENT_LOT_AZURE_ACCOUNT_URL or an argument)"
        )
    if mode == "azure_identity" and urlsplit(account_url_of(settings)).scheme != "https":
        raise ValueError("credential=azure_identity sends tokens and needs an https account_url")


@functools.lru_cache(maxsize=None)
def _retry_class():
    from azure.storage.blob import ExponentialRetry

    class EngineBackoffRetry(ExponentialRetry):
        """The SDK's per-request retries, with the engine's backoff (full jitter, capped)."""

        def __init__(self, policy: RetryPolicy, **kwargs: Any):
            self.lot_policy = policy
            super().__init__(**kwargs)

        def get_backoff_time(self, settings: dict) -> float:
            return self.lot_policy.delay(settings["count"])

    return EngineBackoffRetry


def sdk_retry_policy(settings: Mapping[str, Any]):
    """Per-request retries inside the SDK: max_attempts attempts per request, like boto3's.

    The engine retries a whole transfer on top of this (only when the SDK gave
    up on a transient error), so one bad block does not restart a large upload.
    """
    retries = settings["max_attempts"] - 1
    return _retry_class()(
        RetryPolicy.from_settings(settings), retry_total=retries, retry_connect=retries,
        retry_read=retries, retry_status=retries, retry_to_secondary=False,
    )


class NoCredential(Exception):
    """No credential could be resolved on the executor."""


class NoAccount(Exception):
    """A credential was found but no account to use it with."""


class AzureAccount:
    """The account of one backend: resolves the credential on the executor, in the
    order of ``credential``, and builds the ``BlobServiceClient``."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        url = account_url_of(settings)
        self.endpoint = display_url(url) if url else "(account from the connection string)"
        # Kept out of the client's URLs (and so out of messages); copy sources need it.
        self.copy_sas: str | None = None
        self._identity = None  # DefaultAzureCredential, closed with the client

    def _secret(self, option: str) -> str | None:
        value = os.environ.get(self.settings[option])
        return value.strip() if value and value.strip() else None

    def client(self):
        """The client for the first credential found, with the transfer options."""
        from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
        from azure.storage.blob import BlobServiceClient

        s = self.settings
        kwargs = {
            "retry_policy": sdk_retry_policy(s),
            "connection_timeout": s["connect_timeout"],
            "read_timeout": s["read_timeout"],
            "max_block_size": s["max_block_size"],
            "max_single_put_size": s["max_single_put_size"],
            # Downloads: the first request is held in memory whole, then ranges of
            # max_block_size are written as they arrive.
            "max_single_get_size": s["max_block_size"],
            "max_chunk_get_size": s["max_block_size"],
        }
        mode = s["credential"]
        url = account_url_of(s)

        if mode in ("auto", "connection_string"):
            connection_string = self._secret("connection_string_env")
            if connection_string is not None:
                return self._from_connection_string(connection_string, url, kwargs)
        if mode in ("auto", "account_key"):
            key = self._secret("account_key_env")
            if key is not None:
                url = self._require_account(url, f"${s['account_key_env']}")
                name = account_name_of(s, url)
                if name is None:
                    raise NoAccount(f"the account of ${s['account_key_env']} is unknown: set account_name")
                return BlobServiceClient(url, credential=AzureNamedKeyCredential(name, key), **kwargs)
        if mode in ("auto", "sas_token"):
            sas = self._secret("sas_token_env")
            if sas is not None:
                sas = sas.lstrip("?")
                if "sig" not in parse_qs(sas):
                    raise NoCredential(f"${s['sas_token_env']} does not hold a SAS token (sv=...&sig=...)")
                url = self._require_account(url, f"${s['sas_token_env']}")
                self.copy_sas = sas
                return BlobServiceClient(url, credential=AzureSasCredential(sas), **kwargs)
        if mode == "anonymous":
            return BlobServiceClient(self._require_account(url, "anonymous access"), **kwargs)
        if mode in ("auto", "azure_identity"):
            return self._with_identity(url, kwargs)
        raise NoCredential(f"${s[mode + '_env']} is not set on the executor")

    def _with_identity(self, url: str | None, kwargs: dict):
        from azure.storage.blob import BlobServiceClient

        s = self.settings
        unset = (
            f"none of ${s['connection_string_env']}, ${s['account_key_env']}, "
            f"${s['sas_token_env']} is set on the executor"
        )
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError as exc:
            if s["credential"] == "azure_identity":
                raise ImportError(
                    "credential=azure_identity needs azure-identity on the executor: "
                    "pip install covalent-lot[azure-identity]"
                ) from exc
            raise NoCredential(
                f"{unset}, and azure-identity (for DefaultAzureCredential) is not installed there"
            ) from None
        if url is None or urlsplit(url).scheme != "https":
            # Only reachable with credential=auto: azure_identity is checked on the client.
            raise NoCredential(
                f"{unset}, and DefaultAzureCredential needs an https account_url or account_name"
            )
        self._identity = DefaultAzureCredential()
        return BlobServiceClient(url, credential=self._identity, **kwargs)

    @staticmethod
    def _require_account(url: str | None, what: str) -> str:
        if url is None:
            raise NoAccount(f"{what} needs the account: set account_url or account_name")
        return url

    def _from_connection_string(self, connection_string: str, url: str | None, kwargs: dict):
        from azure.core.credentials import AzureSasCredential
        from azure.storage.blob import BlobServiceClient

        try:
            service = BlobServiceClient.from_connection_string(connection_string, **kwargs)
        except ValueError as exc:
            # Not chained: a parser's message could quote the string.
            raise NoCredential(
                f"${self.settings['connection_string_env']} is not a valid connection string "
                f"({type(exc).__name__})"
            ) from None
        sas = urlsplit(service.url).query or None
        if url is None or display_url(url) == display_url(service.primary_endpoint):
            self.endpoint = display_url(service.primary_endpoint)
            return service
        # account_url was set explicitly: it wins; the connection string lends its credential.
        credential = service.credential if sas is None else AzureSasCredential(sas)
        if sas is not None:
            self.copy_sas = sas
        service.close()
        return BlobServiceClient(url, credential=credential, **kwargs)

    def copy_source(self, url: str) -> str:
        """``url`` of a copy's source blob, with the SAS the service needs to read it."""
        if self.copy_sas is None or "sig=" in urlsplit(url).query:
            return url
        return url + ("&" if "?" in url else "?") + self.copy_sas

    def close(self) -> None:
        if self._identity is not None:
            self._identity.close()
            self._identity = None

    def hint(self) -> str:
        s = self.settings
        return (
            f"set ${s['connection_string_env']}, ${s['account_key_env']} or ${s['sas_token_env']} "
            f"on the executor (credential={s['credential']}; the variable names are options "
            "of [lot.azure]), or install covalent-lot[azure-identity] for DefaultAzureCredential; "
            "check that the credential may access this container"
        )

    def verdict(self, err: BaseException) -> Classified | None:
        """Failures to authenticate before storage answered anything; None for others."""
        from azure.core.exceptions import ClientAuthenticationError

        if isinstance(err, NoCredential):
            return Classified(ErrorKind.DENIED, f"no Azure credential: {err}", self.hint())
        if isinstance(err, NoAccount):
            return Classified(ErrorKind.INVALID, str(err),
                              "set account_url or account_name in [lot.azure] or COVALENT_LOT_AZURE_ACCOUNT_URL")
        if isinstance(err, ClientAuthenticationError) and getattr(err, "status_code", None) is None:
            # azure-identity could not get a token (no response from storage at all).
            return Classified(ErrorKind.DENIED, first_line(err), self.hint())
        return None


_NO_BODY = re.compile(r"^Operation returned an invalid status '(.*)'$")


def first_line(err: BaseException) -> str:
    message = (getattr(err, "message", None) or str(err) or "").strip()
    line = message.splitlines()[0].strip() if message else type(err).__name__
    # Responses without a body (HEAD) carry the service's message as the HTTP reason.
    match = _NO_BODY.match(line)
    return match.group(1) if match else line
