"""Google credentials for the GCS backend, resolved on the executor.

Credentials are never options: a ``credentials_file`` *path* (read on the
executor), else Application Default Credentials resolved there when the
client is made; with an ``endpoint`` (an emulator) and no file, anonymous.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

__all__ = ["client_kwargs", "credentials_hint"]

_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)


def client_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of ``storage.Client`` for these settings."""
    endpoint = settings["endpoint"]
    kwargs: dict[str, Any] = {}
    if endpoint is not None:
        kwargs["client_options"] = {"api_endpoint": endpoint.rstrip("/")}
    project = settings["project"]
    credentials = None
    if settings["credentials_file"] is not None:
        credentials = _service_account(settings["credentials_file"])
        if project is None:
            project = credentials.project_id
    elif endpoint is not None:
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    if credentials is not None:
        kwargs["credentials"] = credentials
        kwargs["project"] = project  # None: no project (the SDK's "<none>")
    elif project is not None:
        kwargs["project"] = project
    # Without credentials the SDK resolves Application Default Credentials itself.
    return kwargs


def _service_account(path: str):
    """Service-account credentials from a key file on this machine (the executor)."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.oauth2 import service_account

    try:
        return service_account.Credentials.from_service_account_file(
            os.path.expanduser(path), scopes=list(_SCOPES)
        )
    except (OSError, ValueError) as exc:
        # Not FileNotFoundError: that would read as "the object does not exist".
        raise DefaultCredentialsError(
            f"credentials_file {path!r} is not a readable service-account key: {exc}"
        ) from exc


def credentials_hint(settings: Mapping[str, Any]) -> str:
    """What to do about credentials that are missing or refused."""
    path = settings["credentials_file"]
    if path is not None:
        return (f"check that credentials_file {path!r} exists on the executor and holds a "
                "valid service-account key")
    return ("give the executor Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, "
            "`gcloud auth application-default login`, or a service account), or set "
            "credentials_file in [lot.gcs]")
