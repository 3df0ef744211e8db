#!/usr/bin/env python
"""Per-backend transfer measurements, one fresh child process per transfer.

The parent side (``measure_backend``) starts nothing itself: ``bench/suite.py``
hands it a started integration kit. For every size it times, per direction,

* ``lot``      - covalent-lot (``strategy_for(uri).put/get``, checksums on);
* the plain SDK with the same tuned settings (boto3 ``upload_file`` /
  ``download_file``; google-cloud-storage chunked upload / ``download_to_filename``;
  azure-storage-blob ``upload_blob`` / ``download_blob(max_concurrency).readinto``),
  or for SFTP the OpenSSH ``sftp`` client with the cipher covalent-lot prefers
  (``-c aes128-gcm@openssh.com``);
* Covalent's own strategy for the backend (``covalent.fs_strategies``), its
  callable run the way an executor runs it (for SFTP: ``Rsync``, whose ssh gets the
  same cipher from the bench's ssh config);
* on request (``EXTRA_TOOLS``; no target needs them): for SFTP OpenSSH ``sftp``
  with its default cipher, ``scp`` and paramiko ``put``/``get``.

The child side (``python bench/throughput.py --child SPEC``) imports what its
tool needs, records VmHWM (the baseline after imports), runs the transfer
(timed; SDK clients are built inside the timed part, as an electron would),
and prints one JSON line: seconds, baseline and peak RSS, or the error.
Checksums of the bytes that arrived are computed by the parent, untimed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
CHILD_TIMEOUT = 1800  # seconds; a 1 GiB transfer at 5 MiB/s still fits

# The cipher covalent-lot's SFTP transports prefer; the SSH peers get it too, so the
# comparison is of the transfer code, not of the cipher.
SSH_CIPHER = "aes128-gcm@openssh.com"

# Tools per backend, in the order they run. The first is covalent-lot, the second
# the baseline that ratios are computed against, the third Covalent's own strategy.
TOOLS: dict[str, list[str]] = {
    "s3": ["lot", "sdk", "builtin"],
    "gcs": ["lot", "sdk", "builtin"],
    "azure": ["lot", "sdk", "builtin"],
    "sftp": ["lot", "sdk", "builtin"],
}
# Run only when asked (bench/suite.py --extra-tools): no target compares against them,
# and at 512 MiB-1 GiB x 3 rounds each costs about a minute.
EXTRA_TOOLS: dict[str, list[str]] = {"sftp": ["sftp-default", "scp", "paramiko"]}

TOOL_LABELS: dict[tuple[str, str], str] = {
    ("s3", "lot"): "covalent-lot",
    ("s3", "sdk"): "boto3 upload_file/download_file",
    ("s3", "builtin"): "Covalent S3",
    ("gcs", "lot"): "covalent-lot",
    ("gcs", "sdk"): "google-cloud-storage",
    ("gcs", "builtin"): "Covalent GCloud",
    ("azure", "lot"): "covalent-lot",
    ("azure", "sdk"): "azure-storage-blob",
    ("azure", "builtin"): "Covalent Blob (client swapped for Azurite)",
    ("sftp", "lot"): "covalent-lot",
    ("sftp", "sdk"): "OpenSSH sftp (aes128-gcm)",
    ("sftp", "builtin"): "Covalent Rsync (aes128-gcm)",
    ("sftp", "sftp-default"): "OpenSSH sftp (default cipher)",
    ("sftp", "scp"): "OpenSSH scp (default cipher)",
    ("sftp", "paramiko"): "paramiko put/get",
}

# What each of Covalent's own strategies needed to run here, or why it could not.
BUILTIN_NOTES: dict[str, str] = {
    "s3": ("run as shipped; pointed at SeaweedFS only through boto3's AWS_ENDPOINT_URL_S3 "
           "(S3() has no endpoint option); boto3 default TransferConfig; no end-to-end checksum"),
    "gcs": ("GCloud() accepts only a service-account JSON (no endpoint, no anonymous mode): "
            "run with a throwaway service account whose token_uri is a local stub, and "
            "STORAGE_EMULATOR_HOST; download lists by prefix and writes in place (not atomic); "
            "no end-to-end checksum"),
    "azure": ("cannot be pointed at an emulator as shipped: the account URL is https://<URI host> "
              "and only ClientSecretCredential (Entra ID) is accepted; run with its "
              "_get_blob_service_client replaced by a connection-string client for Azurite, "
              "transfer code unchanged: upload_blob with default concurrency, download via "
              "readall() (whole blob in memory) written in place (not atomic); no checksum"),
    "sftp": ("Rsync() shells out to `rsync -ae \"ssh -i KEY\"` (shell=True; no port or cipher option, so "
             "the port, known_hosts and `Ciphers aes128-gcm@openssh.com` come from an ssh wrapper first on "
             "PATH that adds -F with this run's config); rsync's own whole-file checksum, no checksum stored"),
}


# ----------------------------------------------------------------------------- child


def _high_water_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _ssh_options(spec: dict) -> list[str]:
    return [
        "-i", spec["key_file"],
        "-o", f"UserKnownHostsFile={spec['known_hosts']}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes",
    ]


_CLI_PEAK_MIB = [0.0]


def _run_cli(args: list[str], stdin: Optional[str] = None) -> None:
    """Run a command-line client; record its process tree's peak RSS, sampled.

    ru_maxrss of children would report at least this interpreter's RSS at fork
    time (Linux carries the pre-exec high-water mark over), so the tree (e.g.
    sftp and the ssh it runs) is sampled every 20 ms instead.
    """
    import psutil

    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=devnull, stderr=subprocess.PIPE, text=True)
        if stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(root, with_root=True))
            time.sleep(0.02)
        err = proc.stderr.read()
    _CLI_PEAK_MIB[0] = max(_CLI_PEAK_MIB[0], peak / MiB)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}: {err.strip()[-1500:]}")


def _paramiko_client(spec: dict):
    import paramiko

    ssh = paramiko.SSHClient()
    ssh.load_host_keys(spec["known_hosts"])
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    ssh.connect(spec["host"], port=spec["port"], username=spec["user"], key_filename=spec["key_file"],
                allow_agent=False, look_for_keys=False, timeout=10)
    return ssh


def _gcs_token_stub() -> str:
    """A local OAuth token endpoint for GCloud's service-account credentials."""
    import http.server
    import threading

    class Token(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"access_token": "bench", "expires_in": 3600, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/token"


def _service_account_file(directory: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {
        "type": "service_account", "project_id": "test", "private_key_id": "bench",
        "private_key": pem, "client_email": "bench@test.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": _gcs_token_stub(),
    }
    path = os.path.join(directory, "bench-service-account.json")
    with open(path, "w") as f:
        json.dump(info, f)
    return path


def _s3_client(s: dict):
    """A boto3 client and the TransferConfig covalent-lot uses, from its settings."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3", endpoint_url=s["endpoint_url"], region_name=s["region_name"])
    return client, TransferConfig(multipart_threshold=s["multipart_threshold"],
                                  multipart_chunksize=s["multipart_chunksize"],
                                  max_concurrency=s["max_concurrency"])


def _gcs_chunk_size(s: dict, path: str) -> int:
    """The plain SDK's chunk size: covalent-lot's, or where covalent-lot sends the whole
    object in one request (chunk_size None) one chunk that covers the file - the same
    request shape (google-cloud-storage would otherwise use 100 MiB chunks; it reads a
    chunk into memory, so its peak RSS grows with the file)."""
    if s.get("chunk_size"):
        return s["chunk_size"]
    quantum = 256 * 1024
    return max(quantum, -(-os.path.getsize(path) // quantum) * quantum)


def _prepare_single(spec: dict) -> Callable[[], Any]:
    """Imports and setup (untimed); returns the timed transfer."""
    backend, tool, direction = spec["backend"], spec["tool"], spec["direction"]
    path, s = spec["path"], spec.get("settings", {})
    up = direction == "up"

    if tool == "lot":
        import covalent_lot

        strategy = covalent_lot.strategy_for(spec["uri"])  # options from the environment
        import importlib

        # The SDK the transfer will use, imported before the baseline as for the other tools
        # (SFTP: paramiko, and asyncssh too when it is the transport, as by default).
        importlib.import_module({"s3": "boto3", "gcs": "google.cloud.storage",
                                 "azure": "azure.storage.blob", "sftp": "paramiko"}[backend])
        if backend == "sftp":
            try:
                from covalent_lot.strategies._sftp_wire import chosen_transport

                importlib.import_module(chosen_transport(strategy.settings["transport"]))
            except (ImportError, AttributeError, KeyError):
                pass
        return (lambda: strategy.put(path, spec["uri"])) if up else (lambda: strategy.get(spec["uri"], path))

    if tool == "builtin":
        return _prepare_builtin(spec)

    bucket, key = spec.get("bucket"), spec.get("key")
    if backend == "s3":
        import boto3.s3.transfer  # noqa: F401 - imported before the timed call

        def run():
            client, config = _s3_client(s)
            if up:
                client.upload_file(path, bucket, key, Config=config)
            else:
                client.download_file(bucket, key, path, Config=config)
        return run

    if backend == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        def run():
            client = storage.Client(project=s["project"], credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": s["endpoint"]})
            if up:
                blob = client.bucket(bucket).blob(key, chunk_size=_gcs_chunk_size(s, path))
                blob.upload_from_filename(path, checksum="crc32c", timeout=s["timeout"])
            else:
                # No chunk size on download: one streamed GET (a chunk size turns it
                # into ranged requests, about half as fast; SERVERS.md).
                client.bucket(bucket).blob(key).download_to_filename(path, checksum="crc32c",
                                                                     timeout=s["timeout"])
        return run

    if backend == "azure":
        from azure.storage.blob import BlobClient

        def run():
            blob = BlobClient.from_connection_string(
                os.environ["AZURE_STORAGE_CONNECTION_STRING"], bucket, key,
                max_block_size=s["max_block_size"], max_single_put_size=s["max_single_put_size"])
            if up:
                with open(path, "rb") as f:
                    blob.upload_blob(f, overwrite=True, max_concurrency=s["max_concurrency"])
            else:
                with open(path, "wb") as f:
                    blob.download_blob(max_concurrency=s["max_concurrency"]).readinto(f)
        return run

    # sftp
    remote = spec["remote_path"]
    target = f"{spec['user']}@{spec['host']}"
    if tool in ("sdk", "sftp-default"):  # OpenSSH sftp: covalent-lot's cipher, or its default
        batch = f"put {path} {remote}\n" if up else f"get {remote} {path}\n"
        cipher = ["-c", SSH_CIPHER] if tool == "sdk" else []
        args = ["sftp", "-q", "-b", "-", "-P", str(spec["port"]), *cipher, *_ssh_options(spec), target]
        return lambda: _run_cli(args, stdin=batch)
    if tool == "scp":
        a, b = (path, f"{target}:{remote}") if up else (f"{target}:{remote}", path)
        args = ["scp", "-q", "-P", str(spec["port"]), *_ssh_options(spec), a, b]
        return lambda: _run_cli(args)
    if tool == "paramiko":
        import paramiko  # noqa: F401

        def run():
            ssh = _paramiko_client(spec)
            try:
                sftp = ssh.open_sftp()
                sftp.put(path, remote) if up else sftp.get(remote, path)
            finally:
                ssh.close()
        return run
    raise ValueError(f"unknown tool {tool!r} for {backend}")


def _prepare_builtin(spec: dict) -> Callable[[], Any]:
    backend, direction, path = spec["backend"], spec["direction"], spec["path"]
    from covalent import fs_strategies
    from covalent._file_transfer.file import File

    local = File(path)
    if backend == "s3":
        import boto3  # noqa: F401

        # S3() has no endpoint option; boto3 reads this variable (1.28+).
        os.environ["AWS_ENDPOINT_URL_S3"] = spec["settings"]["endpoint_url"]
        strategy = fs_strategies.S3(region_name=spec["settings"]["region_name"])
        remote = File(f"s3://{spec['bucket']}/{spec['key']}")
    elif backend == "gcs":
        from google.cloud import storage  # noqa: F401

        os.environ["STORAGE_EMULATOR_HOST"] = spec["settings"]["endpoint"]
        strategy = fs_strategies.GCloud(credentials=_service_account_file(spec["scratch"]),
                                        project_id=spec["settings"]["project"])
        remote = File(f"gs://{spec['bucket']}/{spec['key']}")
    elif backend == "azure":
        from azure.storage.blob import BlobServiceClient

        class AzuriteBlob(fs_strategies.Blob):
            def _get_blob_service_client(self, storage_account_url):
                return BlobServiceClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"])

        strategy = AzuriteBlob()
        remote = File(f"blob://devstoreaccount1.blob.core.windows.net/{spec['bucket']}/{spec['key']}")
    else:  # sftp
        if spec.get("ssh_bin"):  # port and known_hosts for the ssh that rsync runs
            os.environ["PATH"] = spec["ssh_bin"] + os.pathsep + os.environ.get("PATH", "")
        strategy = fs_strategies.Rsync(user=spec["user"], host=spec["host"], private_key_path=spec["key_file"])
        remote = File(spec["remote_path"], is_remote=True)
    call = strategy.upload(local, remote) if direction == "up" else strategy.download(remote, local)
    return call


def _folder_sdk(spec: dict) -> Callable[[], Any]:
    """The plain SDK doing a folder the obvious way: one sequential per-file loop."""
    backend, up, s = spec["backend"], spec["direction"] == "up", spec["settings"]
    folder, bucket, prefix = spec["path"], spec.get("bucket"), spec.get("key", "")
    names = sorted(os.listdir(folder)) if up else None

    if backend == "s3":
        import boto3.s3.transfer  # noqa: F401 - imported before the timed call

        def run():
            client, config = _s3_client(s)
            if up:
                for name in names:
                    client.upload_file(os.path.join(folder, name), bucket, prefix + name, Config=config)
                return
            os.makedirs(folder, exist_ok=True)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    client.download_file(bucket, obj["Key"], os.path.join(folder, obj["Key"][len(prefix):]),
                                         Config=config)
        return run

    if backend == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        def run():
            client = storage.Client(project=s["project"], credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": s["endpoint"]})
            b = client.bucket(bucket)
            if up:
                for name in names:
                    b.blob(prefix + name).upload_from_filename(os.path.join(folder, name), checksum="crc32c")
                return
            os.makedirs(folder, exist_ok=True)
            for blob in client.list_blobs(bucket, prefix=prefix):
                blob.download_to_filename(os.path.join(folder, blob.name[len(prefix):]), checksum="crc32c")
        return run

    if backend == "azure":
        from azure.storage.blob import ContainerClient

        def run():
            container = ContainerClient.from_connection_string(
                os.environ["AZURE_STORAGE_CONNECTION_STRING"], bucket)
            if up:
                for name in names:
                    with open(os.path.join(folder, name), "rb") as f:
                        container.upload_blob(prefix + name, f, overwrite=True)
                return
            os.makedirs(folder, exist_ok=True)
            for item in container.list_blobs(name_starts_with=prefix):
                with open(os.path.join(folder, item.name[len(prefix):]), "wb") as f:
                    container.download_blob(item.name).readinto(f)
        return run

    # sftp: one SFTPClient, sequential put/get
    import paramiko  # noqa: F401

    remote = spec["remote_path"].rstrip("/")

    def run():
        ssh = _paramiko_client(spec)
        try:
            sftp = ssh.open_sftp()
            if up:
                try:
                    sftp.mkdir(remote)
                except OSError:
                    pass
                for name in names:
                    sftp.put(os.path.join(folder, name), f"{remote}/{name}")
                return
            os.makedirs(folder, exist_ok=True)
            for name in sftp.listdir(remote):
                if name.endswith((".lot-crc32c", ".lot-sha256")):
                    continue
                sftp.get(f"{remote}/{name}", os.path.join(folder, name))
        finally:
            ssh.close()
    return run


def is_cli(backend: str, tool: str) -> bool:
    """Whether the tool is a command-line client (its memory: its process tree's)."""
    return tool in ("scp", "sftp-default") or (backend == "sftp" and tool in ("sdk", "builtin"))


def _tree_rss(root, with_root: bool) -> int:
    """RSS bytes of ``root``'s descendants (and of ``root`` itself), gone ones skipped."""
    import psutil

    total = 0
    try:
        for p in ([root] if with_root else []) + root.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def _sample_children(stop) -> None:
    """Peak RSS of this process's descendants (e.g. Rsync's shell, rsync and ssh) into
    _CLI_PEAK_MIB, every 20 ms until ``stop`` is set."""
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        _CLI_PEAK_MIB[0] = max(_CLI_PEAK_MIB[0], _tree_rss(me, with_root=False) / MiB)
        stop.wait(0.02)


def child_main(spec: dict) -> dict:
    if spec.get("folder") and spec["tool"] == "sdk":
        run = _folder_sdk(spec)
    else:
        run = _prepare_single(spec)
    sampler = None
    if is_cli(spec["backend"], spec["tool"]) and spec["tool"] == "builtin":
        import threading  # Rsync runs its command itself: sample its children from here

        stop = threading.Event()
        sampler = threading.Thread(target=_sample_children, args=(stop,), daemon=True)
        sampler.start()
    base = _high_water_mib()
    started = time.perf_counter()
    try:
        run()
    finally:
        if sampler is not None:
            stop.set()
            sampler.join()
    seconds = time.perf_counter() - started
    cli = is_cli(spec["backend"], spec["tool"])
    # A CLI tool's memory is its own process tree's, sampled, absolute.
    peak = _CLI_PEAK_MIB[0] if cli else _high_water_mib()
    return {"seconds": seconds, "base_mib": 0.0 if cli else base, "peak_mib": peak, "cli": cli}


# ---------------------------------------------------------------------------- parent


def _sits_out(k: tuple[str, str], backend: str, errors: dict) -> bool:
    """Whether (tool, direction) ``k`` is left out of this size: it failed in an
    earlier round, or it is the built-in strategy and that cannot run here (then
    recorded in ``errors``)."""
    tool = k[0]
    if k not in errors and tool == "builtin":
        unavailable = builtin_unavailable(backend)
        if unavailable:
            errors[k] = unavailable
    return k in errors


def settle() -> None:
    """Untimed, before every measured run: write out what earlier runs left in the page
    cache for the disk (``sync``), so that no run pays for another's writeback (the
    store's copy of the previous upload, the previous download's file)."""
    os.sync()


def run_child(spec: dict, timeout: float = CHILD_TIMEOUT, *, script: Optional[Path] = None,
              env: Optional[dict] = None) -> dict:
    """One run of ``script --child <spec>`` (default: this file, one transfer) in a fresh
    interpreter; its last stdout line parsed ({'seconds', 'base_mib', 'peak_mib'} here), or
    {'error'}."""
    script = Path(__file__).resolve() if script is None else script
    settle()
    try:
        out = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                             env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": _last_error(out.stderr) or f"exit {out.returncode}"}
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"error": f"unreadable child output: {lines[-1][:200]}"}


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith((" ", "\t", "Traceback", "During handling", "The above exception")):
            return line.strip()[:400]
    return (lines[-1].strip() if lines else "")[:400]


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: os.PathLike | str) -> str:
    """Digest of a folder: sorted relative names and each file's sha256 (sidecars skipped)."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.endswith((".lot-crc32c", ".lot-sha256"))):
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def write_random(path: Path, mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(MiB)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _remove(path: os.PathLike | str) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


class Backend:
    """What the children need to reach one started kit."""

    def __init__(self, name: str, kit, settings: dict, scratch: Path):
        self.name = name
        self.kit = kit
        self.settings = settings
        self.scratch = scratch
        self.ssh_bin: Optional[Path] = None  # sftp: directory of an `ssh` wrapper for rsync

    def spec(self, tool: str, direction: str, bucket: str, key: str, path: os.PathLike | str,
             folder: bool = False) -> dict:
        spec = {
            "backend": self.name, "tool": tool, "direction": direction, "bucket": bucket,
            "key": key, "path": str(path), "settings": self.settings, "uri": self.kit.uri(bucket, key),
            "folder": folder, "scratch": str(self.scratch),
        }
        if self.name == "sftp":
            spec.update(
                remote_path=self.kit.path(bucket, key), host="127.0.0.1", port=self.kit.server.port,
                user="root", key_file=str(self.kit.server.client_key), known_hosts=str(self.kit.known_hosts),
                ssh_bin=str(self.ssh_bin) if self.ssh_bin else None,
            )
        return spec


def builtin_unavailable(backend: str) -> Optional[str]:
    if backend == "sftp" and shutil.which("rsync") is None:
        return "rsync not installed"
    return None


def measure_backend(b: Backend, sizes: list[int], sources: dict[int, tuple[Path, str]], rounds: int,
                    log: Callable[[str], None], warm_file: Optional[Path] = None,
                    extra_tools: tuple[str, ...] = ()) -> list[dict]:
    """Rows: one per (size, direction, tool), median of ``rounds`` after a warm-up.
    ``extra_tools``: those of EXTRA_TOOLS[backend] to run as well."""
    rows: list[dict] = []
    tools = TOOLS[b.name] + [t for t in EXTRA_TOOLS.get(b.name, []) if t in extra_tools]
    for size in sizes:
        source, digest = sources[size]
        free = shutil.disk_usage(b.scratch).free
        needed = (2 * len(tools) + 4) * size * MiB
        if free < needed:
            log(f"  {b.name} {size} MiB: skipped, {free / MiB:.0f} MiB free < {needed / MiB:.0f} MiB needed")
            for direction in ("up", "down"):
                for tool in tools:
                    rows.append({"backend": b.name, "size_mib": size, "direction": direction, "tool": tool,
                                 "label": TOOL_LABELS[(b.name, tool)], "rounds": 0, "mib_s": None,
                                 "seconds": [], "rss_mib": None, "base_mib": None, "rss_is_cli": False,
                                 "correct": None, "error": "skipped: not enough free disk", "note": None})
            continue
        bucket = b.kit.new_bucket()
        try:
            # Warm-up, untimed: SeaweedFS is slow while it grows a new bucket's
            # volumes, so S3 gets a write of the warm file (>= the size measured).
            warm = warm_file if (b.name == "s3" and warm_file is not None) else source
            r = run_child(b.spec("sdk", "up", bucket, "warm-up.bin", warm))
            if "error" in r:
                log(f"  warm-up failed: {r['error']}")
            runs: dict[tuple[str, str], list[dict]] = {}
            errors: dict[tuple[str, str], str] = {}
            correct: dict[tuple[str, str], Optional[bool]] = {}
            notes: dict[tuple[str, str], str] = {}
            for rnd in range(rounds):
                # odd rounds run the tools in reverse order, so drift and cache
                # effects do not always favour the same one
                order = tools if rnd % 2 == 0 else tools[::-1]
                for tool in order:  # uploads
                    k = (tool, "up")
                    if _sits_out(k, b.name, errors):
                        continue
                    key = f"{tool}-{size}.bin"
                    _fresh_destination(b, bucket, key)
                    r = run_child(b.spec(tool, "up", bucket, key, source))
                    if "error" in r:
                        errors[k] = r["error"]
                        log(f"  {b.name} {size} MiB up {tool}: FAILED {r['error']}")
                        continue
                    runs.setdefault(k, []).append(r)
                    log(f"  {b.name} {size:>5} MiB up   {tool:<9} {size / r['seconds']:8.1f} MiB/s "
                        f"peak +{r['peak_mib'] - r['base_mib']:.0f} MiB")
                    if rnd == 0:  # the bytes stored, read back by the baseline SDK (untimed)
                        correct[k] = _verify_upload(b, bucket, key, digest)
                for tool in order:  # downloads
                    k = (tool, "down")
                    if _sits_out(k, b.name, errors):
                        continue
                    key = f"{tool}-{size}.bin"
                    if (tool, "up") in errors and rnd == 0:
                        # its own upload failed: give it the baseline SDK's copy
                        seed = run_child(b.spec("sdk", "up", bucket, key, source))
                        notes[k] = "object stored by the plain SDK"
                        if "error" in seed:
                            errors[k] = f"could not store its object: {seed['error']}"
                            continue
                    out = b.scratch / f"down-{tool}.bin"
                    _remove(out)
                    r = run_child(b.spec(tool, "down", bucket, key, out))
                    if "error" in r:
                        errors[k] = r["error"]
                        log(f"  {b.name} {size} MiB down {tool}: FAILED {r['error']}")
                        _remove(out)
                        continue
                    ok = out.is_file() and sha256_file(out) == digest
                    correct[k] = ok if correct.get(k, True) is not False else False
                    _remove(out)
                    runs.setdefault(k, []).append(r)
                    log(f"  {b.name} {size:>5} MiB down {tool:<9} {size / r['seconds']:8.1f} MiB/s "
                        f"peak +{r['peak_mib'] - r['base_mib']:.0f} MiB{'' if ok else '  WRONG BYTES'}")
                if b.name == "s3" and size >= 256 and rnd < rounds - 1:
                    _seaweed_vacuum(b)  # untimed, before the next round overwrites again
            for direction in ("up", "down"):
                for tool in tools:
                    k = (tool, direction)
                    rs = runs.get(k, [])
                    row = {
                        "backend": b.name, "size_mib": size, "direction": direction, "tool": tool,
                        "label": TOOL_LABELS[(b.name, tool)], "rounds": len(rs),
                        "mib_s": size / statistics.median(r["seconds"] for r in rs) if rs else None,
                        "seconds": [r["seconds"] for r in rs],
                        "rss_mib": max(r["peak_mib"] - r["base_mib"] for r in rs) if rs else None,
                        "base_mib": statistics.median(r["base_mib"] for r in rs) if rs else None,
                        "rss_is_cli": bool(rs and rs[0].get("cli")),
                        "correct": correct.get(k) if rs else None,
                        "error": errors.get(k),
                        "note": notes.get(k),
                    }
                    rows.append(row)
        finally:
            try:
                b.kit.delete_bucket(bucket)
            except Exception as exc:  # cleanup only
                log(f"  could not delete {bucket}: {exc}")
    _add_ratios(rows)
    return rows


def _fresh_destination(b: Backend, bucket: str, key: str) -> None:
    """Before an SFTP upload (untimed): remove the file an earlier round left there.
    rsync -a skips a file whose size and mtime match (round 2 on would measure
    nothing: 1-2 GiB/s) and would otherwise send deltas; every SFTP tool starts from
    no file. The object stores overwrite whole objects anyway."""
    if b.name == "sftp":
        _remove(b.kit.path(bucket, key))


def _seaweed_vacuum(b: Backend) -> None:
    """Reclaim overwritten objects now: SeaweedFS keeps them on disk until a vacuum,
    and a full run overwrites several GiB per size."""
    import urllib.request

    try:
        master = b.kit.server.ports["master"]
        urllib.request.urlopen(f"http://127.0.0.1:{master}/vol/vacuum?garbageThreshold=0.01", timeout=300).read()
    except Exception:  # only disk space is at stake
        pass


def _verify_upload(b: Backend, bucket: str, key: str, digest: str) -> Optional[bool]:
    if b.name == "sftp":  # the server's disk is ours: read the file directly
        p = Path(b.kit.path(bucket, key))
        return p.is_file() and sha256_file(p) == digest
    out = b.scratch / "verify.bin"
    _remove(out)
    try:
        r = run_child(b.spec("sdk", "down", bucket, key, out))
        if "error" in r:
            return False
        return sha256_file(out) == digest
    finally:
        _remove(out)


def _add_ratios(rows: list[dict]) -> None:
    """``ratio`` to the plain SDK, ``ratio_builtin`` to Covalent's own strategy and, for
    SFTP, ``ratio_peer`` to the faster of the two SSH peers (OpenSSH sftp, Rsync) and
    ``peer`` (its tool) - per backend, size and direction."""
    def speeds(tool: str) -> dict:
        return {(r["backend"], r["size_mib"], r["direction"]): r["mib_s"] for r in rows if r["tool"] == tool}

    sdk, builtin = speeds("sdk"), speeds("builtin")
    for r in rows:
        k = (r["backend"], r["size_mib"], r["direction"])
        ref, own = sdk.get(k), builtin.get(k)
        r["ratio"] = r["mib_s"] / ref if (r["mib_s"] and ref) else None
        r["ratio_builtin"] = r["mib_s"] / own if (r["mib_s"] and own) else None
        if r["backend"] == "sftp":
            # The fastest peer; one that failed (no rsync) leaves the other, none leaves None.
            peers = [(v, t) for v, t in ((ref, "sdk"), (own, "builtin")) if v]
            if peers:
                fastest, r["peer"] = max(peers)
                r["ratio_peer"] = r["mib_s"] / fastest if r["mib_s"] else None
            else:
                r["peer"], r["ratio_peer"] = None, None


def measure_small_files(b: Backend, count: int, file_kib: int, rounds: int,
                        log: Callable[[str], None]) -> list[dict]:
    """A folder of ``count`` small files: lot folder put/get vs the SDK's per-file loop."""
    src = b.scratch / "small-src"
    _remove(src)
    src.mkdir(parents=True)
    for i in range(count):
        (src / f"part-{i:05d}.bin").write_bytes(os.urandom(file_kib * 1024))
    digest = sha256_tree(src)
    rows = []
    bucket = b.kit.new_bucket()
    try:
        runs: dict[tuple[str, str], list[dict]] = {}
        errors: dict[tuple[str, str], str] = {}
        correct: dict[tuple[str, str], bool] = {}
        for _ in range(rounds):
            for direction in ("up", "down"):
                for tool in ("lot", "sdk"):
                    k = (tool, direction)
                    if k in errors:
                        continue
                    key = f"small-{tool}/"
                    path = src if direction == "up" else b.scratch / f"small-down-{tool}"
                    if direction == "down":
                        _remove(path)
                    r = run_child(b.spec(tool, direction, bucket, key, path, folder=True))
                    if "error" in r:
                        errors[k] = r["error"]
                        log(f"  {b.name} small files {direction} {tool}: FAILED {r['error']}")
                        continue
                    runs.setdefault(k, []).append(r)
                    if direction == "down":
                        correct[k] = sha256_tree(path) == digest and correct.get(k, True)
                        correct[(tool, "up")] = correct[k] and correct.get((tool, "up"), True)
                        _remove(path)
                    log(f"  {b.name} {count} x {file_kib} KiB {direction:<4} {tool:<4} "
                        f"{count / r['seconds']:8.1f} files/s")
        for direction in ("up", "down"):
            for tool in ("lot", "sdk"):
                k = (tool, direction)
                rs = runs.get(k, [])
                seconds = statistics.median(r["seconds"] for r in rs) if rs else None
                rows.append({
                    "backend": b.name, "files": count, "file_kib": file_kib, "direction": direction,
                    "tool": tool, "seconds": seconds,
                    "files_s": count / seconds if seconds else None,
                    "mib_s": count * file_kib / 1024 / seconds if seconds else None,
                    "rss_mib": max(r["peak_mib"] - r["base_mib"] for r in rs) if rs else None,
                    "correct": correct.get(k) if rs else None, "error": errors.get(k),
                })
        by = {(r["direction"], r["tool"]): r for r in rows}
        for r in rows:
            ref = by[(r["direction"], "sdk")]["seconds"]
            r["ratio"] = ref / r["seconds"] if (ref and r["seconds"]) else None
    finally:
        try:
            b.kit.delete_bucket(bucket)
        except Exception as exc:
            log(f"  could not delete {bucket}: {exc}")
        _remove(src)
    return rows


def probe_correctness(b: Backend, log: Callable[[str], None], extra_tools: tuple[str, ...] = ()) -> list[dict]:
    """Two small, untimed checks per download tool (1 MiB objects):

    * missing object: download a key that does not exist onto an existing local
      file - does the tool raise, and is the file left as it was (atomic)?
    * prefix sibling: download ``k`` while ``k.old`` (other bytes) also exists -
      are the bytes that arrive those of ``k``?
    """
    rows = []
    bucket = b.kit.new_bucket()
    try:
        src = b.scratch / "probe-src.bin"
        other = b.scratch / "probe-other.bin"
        digest = write_random(src, 1)
        write_random(other, 1)
        seeded = "error" not in run_child(b.spec("sdk", "up", bucket, "probe.bin", src))
        seeded = seeded and "error" not in run_child(b.spec("sdk", "up", bucket, "probe.bin.old", other))
        for tool in TOOLS[b.name] + [t for t in EXTRA_TOOLS.get(b.name, []) if t in extra_tools]:
            row = {"backend": b.name, "tool": tool, "label": TOOL_LABELS[(b.name, tool)]}
            unavailable = builtin_unavailable(b.name) if tool == "builtin" else None
            if unavailable:
                row["error"] = unavailable
                rows.append(row)
                continue
            dest = b.scratch / f"probe-{tool}.bin"
            previous = b"previous contents of the destination\n"
            dest.write_bytes(previous)
            r = run_child(b.spec(tool, "down", bucket, "does-not-exist.bin", dest))
            row["missing_raises"] = "error" in r
            row["missing_error"] = r.get("error")
            if not dest.exists():
                row["missing_dest"] = "deleted"
            else:
                data = dest.read_bytes()
                row["missing_dest"] = ("intact" if data == previous else
                                       "truncated to 0 bytes" if not data else "overwritten")
            _remove(dest)
            if seeded:
                r = run_child(b.spec(tool, "down", bucket, "probe.bin", dest))
                row["sibling_ok"] = ("error" not in r) and dest.is_file() and sha256_file(dest) == digest
                row["sibling_error"] = r.get("error")
            _remove(dest)
            log(f"  {b.name} probe {tool:<9} missing: raises={row['missing_raises']} dest={row['missing_dest']}; "
                f"sibling ok={row.get('sibling_ok')}")
            rows.append(row)
    finally:
        for p in ("probe-src.bin", "probe-other.bin"):
            _remove(b.scratch / p)
        try:
            b.kit.delete_bucket(bucket)
        except Exception as exc:
            log(f"  could not delete {bucket}: {exc}")
    return rows


def strategy_settings(uri: str) -> dict:
    """covalent-lot's resolved options for ``uri`` (from the environment), read in a
    child so that the parent never imports covalent (e2e.py points it at its own
    private config later)."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--settings", uri],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"could not resolve covalent-lot settings for {uri}: {_last_error(out.stderr)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--settings":
        import covalent_lot

        settings = dict(covalent_lot.strategy_for(sys.argv[2]).settings)
        print(json.dumps({k: v for k, v in settings.items()
                          if isinstance(v, (str, int, float, bool, type(None)))}))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        import logging

        logging.getLogger("covalent_lot").setLevel(logging.WARNING)
        print(json.dumps(child_main(spec)))
        sys.exit(0)
    print("run bench/suite.py; this module holds its transfer runners", file=sys.stderr)
    sys.exit(2)
