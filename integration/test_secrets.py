"""No credential travels in a pickle, a log line or an error message, on any backend.

Every backend gets its credentials the way a user gives them: references in
covalent.conf ``[lot.<backend>]`` (variable names, file paths) and the secret
values in the environment or in the files named. Each case lists the values
that must never show up (the ones the local servers really accept: SeaweedFS's
secret key, Azurite's account key, the SSH client key, ...) and every test
hunts for them, in several encodings, in:

* cloudpickles of everything Covalent ships to an executor (strategy, handoff,
  FileTransfers, their callables, a decorated electron, a built lattice);
* every log record of every logger at DEBUG (SDKs included) while a real
  upload, download and copy run, through the very callables Covalent pickles;
* the message and the whole formatted traceback chain of the built-in
  exception raised for wrong credentials;
* everything a real dispatch leaves behind: the worker's DEBUG log, the
  node's stdout/stderr and every file of the private Covalent server.

Two SDK loggers write a secret at DEBUG (botocore: the S3 session token;
urllib3: an Azure SAS signature in request URLs); covalent_lot._logs redacts
them, and the cases with those secrets show it works.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
import secrets as random_secrets
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, quote

import cloudpickle
import pytest
from covalent._file_transfer.enums import Order

import covalent as ct
import covalent_lot as lot

# Workers cannot import this test module: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

from integration import _servers

MiB = 1024 * 1024
TIMEOUT = 300

# Loggers of the SDKs below the transfers; a few set levels of their own.
SDK_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "google", "azure", "paramiko", "asyncssh")

# Cases whose DEBUG logs an SDK is known to leak into: the loggers whose records
# hold the secret (and must: when a fix lands, e.g. a filter in covalent-lot,
# the entry goes). botocore logs the x-amz-security-token header; urllib3 logs
# request URLs, where AzureSasCredential puts the SAS query (sig=...).
# --- finding a secret ------------------------------------------------------------------


def encodings(secret: str | bytes) -> dict[str, bytes]:
    """The forms a secret could take in a byte stream: as is, UTF-16, hex, URL-quoted,
    and base64 at each of the three alignments it could sit at in a longer blob."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "url-quoted": quote(raw, safe="").encode(),
    }
    if isinstance(secret, str):
        forms["utf-16-le"] = secret.encode("utf-16-le")
        forms["utf-16-be"] = secret.encode("utf-16-be")
    for shift in range(3):
        for name, encode in (("base64", base64.b64encode), ("urlsafe-base64", base64.urlsafe_b64encode)):
            # Drop the 4-character groups a neighbouring byte would change.
            core = encode(b"\0" * shift + raw)[4 if shift else 0:-4]
            if len(core) >= 12:
                forms[f"{name}@{shift}"] = core
    return forms


def leaks(blob: bytes, secrets: dict[str, str | bytes]) -> list[str]:
    """Which secrets (and in which encoding) appear in ``blob``."""
    return [f"{label} ({form})" for label, value in secrets.items()
            for form, needle in encodings(value).items() if needle in blob]


def assert_clean(blob: bytes | str, secrets: dict[str, str | bytes], where: str) -> int:
    """Fail naming the secret, encoding and surrounding text; return the bytes scanned."""
    data = blob.encode() if isinstance(blob, str) else blob
    found = leaks(data, secrets)
    if found:
        needle = encodings(secrets[found[0].split(" (")[0]])[found[0].split("(")[-1].rstrip(")")]
        at = data.find(needle)
        context = data[max(0, at - 300):at + len(needle) + 100].decode(errors="replace")
        pytest.fail(f"secret in {where}: {', '.join(found)}\n...{context}...")
    return len(data)


def key_file_secrets(path: Path, label: str) -> dict[str, str | bytes]:
    """A private key file: its text, its longer body lines, and the raw private scalar."""
    from cryptography.hazmat.primitives import serialization

    text = path.read_text()
    # The first body line of an OpenSSH key is the same for every key of its kind.
    lines = [line for line in text.splitlines()[2:] if len(line) >= 40 and "PRIVATE KEY" not in line]
    found: dict[str, str | bytes] = {f"{label} file": text}
    found.update({f"{label} line {i}": line for i, line in enumerate(lines, 2)})
    loader = serialization.load_ssh_private_key if "OPENSSH" in text else serialization.load_pem_private_key
    key = loader(text.encode(), password=None)
    if hasattr(key, "private_bytes_raw"):  # ed25519
        found[f"{label} scalar"] = key.private_bytes_raw()
    else:  # RSA
        d = key.private_numbers().d
        found[f"{label} exponent"] = d.to_bytes((d.bit_length() + 7) // 8, "big")
    return found


def tagged(backend: str, what: str) -> str:
    """A recognisable fake secret, e.g. SECRET-s3-session-token-1f2e..."""
    return f"SECRET-{backend}-{what}-{random_secrets.token_hex(12)}"


# --- capturing every log record -----------------------------------------------------------


class _Collect(logging.Handler):
    """Keeps (logger name, formatted record with traceback) of every record."""

    def __init__(self, into: list[tuple[str, str]]):
        super().__init__(logging.DEBUG)
        self.into = into
        self.setFormatter(logging.Formatter("%(threadName)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted
            text = f"{record.name} UNFORMATTABLE {record.msg!r} {record.args!r}"
        self.into.append((record.name, text))


@contextlib.contextmanager
def debug_logs() -> Iterator[list[tuple[str, str]]]:
    """Every record of every logger, at DEBUG, from every thread (tracebacks included)."""
    import asyncssh

    lines: list[tuple[str, str]] = []
    handler = _Collect(lines)
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("", *SDK_LOGGERS)}
    root.addHandler(handler)
    for name in saved:
        logging.getLogger(name).setLevel(logging.DEBUG)
    asyncssh.set_debug_level(2)  # full debug logging (3 would dump every data packet)
    try:
        yield lines
    finally:
        asyncssh.set_debug_level(1)
        root.removeHandler(handler)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def assert_logs_clean(records: list[tuple[str, str]], secrets: dict, where: str) -> int:
    """No secret in any record."""
    return assert_clean("\n".join(text for _name, text in records), secrets, where)


def error_text(exc: BaseException) -> str:
    """The message and the whole formatted chain (causes, contexts, their messages)."""
    return str(exc) + "\n" + "".join(traceback.format_exception(exc))


# --- a token endpoint for the GCS service-account flow -----------------------------------

TOKEN_SERVER = '''
import http.server, json, sys
token = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''


class TokenServer(_servers.ServerProcess):
    """A process answering OAuth token requests (fake-gcs-server has no token endpoint):
    google-auth trades the service-account key for ``access_token`` there."""

    _name = "token server"

    def __init__(self, workdir: Path, access_token: str):
        super().__init__(workdir, "token-server.log", start_timeout=20.0)
        self.access_token = access_token
        self.port = None

    @property
    def url(self) -> str:
        return f"http://{_servers.LOOPBACK}:{self.port}/token"

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "token_server.py").write_text(TOKEN_SERVER)

    def _command(self) -> list[str]:
        self.port = _servers.free_port(avoid_offsets=())
        return [sys.executable, str(self.workdir / "token_server.py"), str(self.port), self.access_token]

    def _env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "")}

    def _ready(self) -> bool:
        return _servers._http_status(self.url) == 200


@pytest.fixture(scope="session")
def token_server(lot_session_dir):
    server = TokenServer(lot_session_dir / "token-server", tagged("gcs", "access-token")).start()
    yield server
    server.stop()


def write_service_account(path: Path, token_uri: str, private_key: str | None = None) -> Path:
    """A service-account key file as Google issues them, with a fresh RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if private_key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "test", "private_key_id": random_secrets.token_hex(20),
        "private_key": private_key, "client_email": "lot-it@test.iam.gserviceaccount.com",
        "client_id": "100000000000000000001", "token_uri": token_uri,
    }))
    path.chmod(0o600)
    return path


def sas_token(account_key: str) -> str:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    return generate_account_sas(
        "devstoreaccount1", account_key, ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2),
    )


def sas_secrets(token: str) -> dict[str, str]:
    return {"SAS token": token, "SAS signature": parse_qs(token)["sig"][0]}


# --- the cases: how each backend is handed its credentials --------------------------------


@dataclass
class Case:
    """Credentials for one backend: ``env`` holds the secrets (or names files holding
    them), ``conf`` is ``[lot.<backend>]`` (references only), ``secrets`` the values
    to hunt for; ``wrong`` are (label, env, conf, secrets) whose requests fail."""

    env: dict[str, str | None]
    conf: dict[str, Any]
    secrets: dict[str, str | bytes]
    denied: bool = False  # the server refuses these credentials themselves
    used: Callable[[], bool] | None = None  # evidence that the transfers used them
    wrong: list[tuple[str, dict, dict, dict]] = field(default_factory=list)


def s3_keys(kit, tmp: Path, request) -> Case:
    wrong = tagged("s3", "wrong-secret-key")
    return Case(
        env={"AWS_ACCESS_KEY_ID": kit.access_key, "AWS_SECRET_ACCESS_KEY": kit.secret_key},
        conf={"endpoint_url": kit.endpoint, "region_name": kit.region, "addressing_style": "path"},
        secrets={"AWS_SECRET_ACCESS_KEY": kit.secret_key},
        wrong=[("wrong secret key", {"AWS_SECRET_ACCESS_KEY": wrong}, {}, {"wrong secret key": wrong})],
    )


def s3_session_token(kit, tmp: Path, request) -> Case:
    # SeaweedFS refuses session tokens: the request is made (and logged), then denied.
    case = s3_keys(kit, tmp, request)
    token = tagged("s3", "session-token")
    case.env["AWS_SESSION_TOKEN"] = token
    case.secrets["AWS_SESSION_TOKEN"] = token
    case.denied = True
    return case


def gcs_service_account(kit, tmp: Path, request) -> Case:
    server = request.getfixturevalue("token_server")
    key_file = write_service_account(tmp / "service-account.json", server.url)
    broken = tagged("gcs", "not-a-key")
    broken_file = write_service_account(
        tmp / "broken.json", server.url,
        f"-----BEGIN PRIVATE KEY-----\n{broken}\n-----END PRIVATE KEY-----\n")
    private_key = json.loads(key_file.read_text())["private_key"]
    (tmp / "key.pem").write_text(private_key)
    return Case(
        env={},
        conf={"endpoint": kit.endpoint, "project": "test", "credentials_file": str(key_file)},
        secrets={**key_file_secrets(tmp / "key.pem", "service-account key"),
                 "access token": server.access_token},
        wrong=[("unreadable key file", {}, {"credentials_file": str(broken_file)}, {"broken key": broken})],
        used=lambda: "POST /token" in server.log_path.read_text(),
    )


def _azure(kit, env: dict, conf: dict, secrets: dict, wrong_env: dict, wrong_secrets: dict) -> Case:
    unset = {"AZURE_STORAGE_CONNECTION_STRING": None, "AZURE_STORAGE_KEY": None, "AZURE_STORAGE_SAS_TOKEN": None}
    return Case(
        env={**unset, **env},
        conf={"account_url": kit.endpoint, **conf},
        secrets={"account key": _azure_kit().ACCOUNT_KEY, **secrets},
        wrong=[("wrong secret", wrong_env, {}, wrong_secrets)],
    )


def _azure_kit():
    from integration import _kit_azure

    return _kit_azure


def wrong_azure_key() -> str:
    return base64.b64encode(tagged("azure", "wrong-key").encode().ljust(64, b"=")).decode()


def azure_connection_string(kit, tmp: Path, request) -> Case:
    good = _azure_kit().connection_string(kit.endpoint)
    wrong = wrong_azure_key()
    return _azure(kit, {"AZURE_STORAGE_CONNECTION_STRING": good}, {"credential": "connection_string"},
                  {"connection string": good},
                  {"AZURE_STORAGE_CONNECTION_STRING": _azure_kit().connection_string(kit.endpoint, wrong)},
                  {"wrong key": wrong})


def azure_account_key(kit, tmp: Path, request) -> Case:
    wrong = wrong_azure_key()
    return _azure(kit, {"LOT_IT_AZURE_KEY": _azure_kit().ACCOUNT_KEY},
                  {"credential": "account_key", "account_key_env": "LOT_IT_AZURE_KEY",
                   "account_name": "devstoreaccount1"},
                  {}, {"LOT_IT_AZURE_KEY": wrong}, {"wrong key": wrong})


def azure_sas_token(kit, tmp: Path, request) -> Case:
    good, wrong = sas_token(_azure_kit().ACCOUNT_KEY), sas_token(wrong_azure_key())
    return _azure(kit, {"AZURE_STORAGE_SAS_TOKEN": good}, {"credential": "sas_token"}, sas_secrets(good),
                  {"AZURE_STORAGE_SAS_TOKEN": wrong}, sas_secrets(wrong))


def sftp_key_file(kit, tmp: Path, request) -> Case:
    garbage = tagged("sftp", "not-a-key")
    garbage_file = tmp / "garbage_key"
    garbage_file.write_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{garbage}\n-----END OPENSSH PRIVATE KEY-----\n")
    garbage_file.chmod(0o600)
    return Case(
        env={"COVALENT_LOT_SFTP_KEY_FILENAME": None, "SSH_AUTH_SOCK": None},
        conf={"key_filename": str(kit.server.client_key), "known_hosts": str(kit.known_hosts),
              "username": "root", "allow_agent": False},
        secrets=key_file_secrets(kit.server.client_key, "client key"),
        wrong=[
            ("unauthorized key", {}, {"key_filename": str(kit.wrong_key)},
             key_file_secrets(kit.wrong_key, "unauthorized key")),
            ("not a key", {}, {"key_filename": str(garbage_file)}, {"garbage key": garbage}),
        ],
    )


CASES: dict[tuple[str, str], Callable[..., Case]] = {
    ("s3", "keys"): s3_keys,
    ("s3", "session_token"): s3_session_token,
    ("gcs", "service_account"): gcs_service_account,
    ("azure", "connection_string"): azure_connection_string,
    ("azure", "account_key"): azure_account_key,
    ("azure", "sas_token"): azure_sas_token,
    ("sftp", "key_file"): sftp_key_file,
}


def _selected_backends() -> list[str]:
    """The backends integration/conftest.py selected (LOT_BACKENDS, servers installed)."""
    for module in list(sys.modules.values()):
        if str(getattr(module, "__file__", "")).endswith(os.path.join("integration", "conftest.py")):
            return list(module.BACKENDS)
    return []


# Each test runs once per credential case of each selected backend. A parametrize
# mark (not a hook) so that it replaces the kit fixture's own per-backend params.
per_case = pytest.mark.parametrize(
    ["kit", "case_name"],
    [pytest.param(backend, name, id=f"{backend}-{name}")
     for backend, name in CASES if backend in _selected_backends()],
    indirect=["kit"],
)


@pytest.fixture
def conf_and_env(monkeypatch):
    """``apply(section, env, conf)``: set variables and replace ``[lot.<section>]`` of the
    private covalent.conf (in memory, as Covalent's reader returns it); the kit's
    COVALENT_LOT_<SECTION>_<OPTION> variables for those options, which would win, go."""
    from covalent._shared_files import config

    sections = []

    def apply(section: str, env: dict, conf: dict) -> None:
        for option in conf:  # the kit's variables for these options would win over conf
            monkeypatch.delenv(f"COVALENT_LOT_{section.upper()}_{option.upper()}", raising=False)
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        sections.append(section)
        config.update_config({"lot": {section: dict(conf)}})
        config.get_config("lot")[section] = dict(conf)  # update_config merges; replace

    yield apply
    for section in sections:
        config.get_config("lot").pop(section, None)
    config._config_manager.write_config()


@pytest.fixture
def case(kit, case_name, tmp_path, request, conf_and_env) -> Case:
    built = CASES[(kit.name, case_name)](kit, tmp_path, request)
    conf_and_env(kit.name, built.env, built.conf)
    return built


def write_tree(root: Path) -> dict[str, bytes]:
    files = {"one.bin": os.urandom(3 * MiB + 17), "sub/two.bin": os.urandom(100_000), "sub/empty": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def run_shipped(transfer) -> Any:
    """Run a FileTransfer the way an executor does: unpickle its callables, call them."""
    pre, call = transfer.cp()
    cloudpickle.loads(cloudpickle.dumps(pre))()
    return cloudpickle.loads(cloudpickle.dumps(call))()


# --- the tests -----------------------------------------------------------------------------


@per_case
def test_pickles_carry_no_secrets(kit, case, bucket, tmp_path):
    strategy = lot.strategy_for(kit.scheme + "://")
    assert strategy.settings.sources[next(iter(case.conf))] == f"covalent.conf [lot.{kit.name}]"
    h = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/x.npy"))
    folder = lot.handoff(kit.uri(bucket, "runs/{dispatch_id}/shards/"))
    single = [lot.upload(kit.uri(bucket, "u.bin"), str(tmp_path / "u.bin")),
              lot.download(kit.uri(bucket, "u.bin"), str(tmp_path / "d.bin"))]
    transfers = [h.upload(), h.download(), folder.upload(), folder.download(), *single]

    @ct.electron(files=[h.upload(), folder.download()])
    def produce(files=[]):
        return h.path

    @ct.lattice
    def flow():
        return produce()

    flow.build_graph()
    shipped = {"strategy": strategy, "handoff": h, "folder handoff": folder, "electron": produce,
               "lattice (json)": flow.serialize_to_json().encode()}
    for i, transfer in enumerate(transfers):
        shipped[f"transfer {i}"] = transfer
        for j, part in enumerate(transfer.cp()):
            shipped[f"transfer {i} callable {j}"] = part
    scanned = 0
    for what, obj in shipped.items():
        blob = obj if isinstance(obj, bytes) else cloudpickle.dumps(obj)
        scanned += assert_clean(blob, case.secrets, f"the pickled {what}")
    print(f"\n{kit.name}: {len(case.secrets)} secrets, {len(shipped)} pickles, {scanned:,} bytes clean")


@per_case
def test_transfer_logs_carry_no_secrets(kit, case_name, case, bucket, tmp_path):
    files = write_tree(tmp_path / "src")
    with debug_logs() as lines:
        try:
            run_shipped(lot.upload(kit.uri(bucket, "s/one.bin"), str(tmp_path / "src" / "one.bin")))
            run_shipped(lot.download(kit.uri(bucket, "s/one.bin"), str(tmp_path / "out" / "one.bin")))
            run_shipped(lot.upload(kit.uri(bucket, "tree/"), str(tmp_path / "src")))
            run_shipped(lot.download(kit.uri(bucket, "tree/"), str(tmp_path / "tree")))
            lot.strategy_for(kit.scheme + "://").copy(kit.uri(bucket, "s/one.bin"), kit.uri(bucket, "s/copy.bin"))
        except PermissionError as exc:
            if not case.denied:
                raise
            assert_clean(error_text(exc), case.secrets, "the denial")
        else:
            assert not case.denied, "the server accepted credentials it should refuse"
            assert case.used is None or case.used(), "the transfers did not use the credentials"
            assert (tmp_path / "out" / "one.bin").read_bytes() == files["one.bin"]
            assert all((tmp_path / "tree" / rel).read_bytes() == data for rel, data in files.items())
    assert len(lines) > 20 and any(" DEBUG " in text for _, text in lines), "no DEBUG records: capture broken"
    scanned = assert_logs_clean(lines, case.secrets, "the DEBUG logs")
    print(f"\n{kit.name}: {len(case.secrets)} secrets, {len(lines)} log records, {scanned:,} bytes clean")


@per_case
def test_errors_carry_no_secrets(kit, case_name, case, bucket, tmp_path, conf_and_env):
    source = tmp_path / "x.bin"
    source.write_bytes(b"x" * 1000)
    kit.put_bytes(bucket, "there.bin", b"there")
    misclassified = []
    for label, env, conf, wrong_secrets in case.wrong:
        conf_and_env(kit.name, {**case.env, **env}, {**case.conf, **conf})
        hunted = {**case.secrets, **wrong_secrets}
        strategy = lot.strategy_for(kit.scheme + "://", max_attempts=1)
        for attempt in (lambda: strategy.put(str(source), kit.uri(bucket, "x.bin")),
                        lambda: strategy.get(kit.uri(bucket, "there.bin"), str(tmp_path / "got.bin"))):
            with debug_logs() as lines, pytest.raises(OSError) as caught:
                attempt()
            assert_clean(error_text(caught.value), hunted, f"the error for {label}")
            assert_logs_clean(lines, hunted, f"the DEBUG logs for {label}")
            if not isinstance(caught.value, PermissionError):
                misclassified.append((label, caught.value))
    assert misclassified == [], f"wrong credentials not raised as PermissionError: {misclassified}"


# --- a real dispatch -------------------------------------------------------------------------


def start_debug_log(path: str) -> None:
    """On the worker: every logger at DEBUG into ``path`` (removed again by stop_debug_log)."""
    import logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(threadName)s %(name)s %(levelname)s %(message)s"))
    handler.lot_it_debug = True
    root = logging.getLogger()
    handler.lot_it_saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def stop_debug_log() -> None:
    import logging

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "lot_it_debug", False)]:
        root.removeHandler(handler)
        root.setLevel(handler.lot_it_saved)
        handler.close()


def kit_secrets(kit, tmp: Path, request) -> tuple[dict[str, str | bytes], dict]:
    """The secrets the Covalent server's workers hold (the kit's env), and options."""
    if kit.name == "s3":
        return {"AWS_SECRET_ACCESS_KEY": kit.secret_key}, {}
    if kit.name == "azure":
        return {"account key": _azure_kit().ACCOUNT_KEY}, {}
    if kit.name == "sftp":
        return key_file_secrets(kit.server.client_key, "client key"), {}
    # fake-gcs-server needs no credentials; a key file (a path, on this machine) is the test.
    case = gcs_service_account(kit, tmp, request)
    return case.secrets, {"credentials_file": case.conf["credentials_file"]}


def test_dispatch_leaves_no_secret(covalent_server, kit, bucket, tmp_path, lot_session_dir, request):
    secrets, options = kit_secrets(kit, tmp_path, request)
    log_path = tmp_path / "worker-debug.log"
    local = str(tmp_path / "produced.bin")
    up = lot.upload(kit.uri(bucket, "d/produced.bin"), local, **options)
    # A post-exec download of what was just uploaded: both run with DEBUG logging on.
    down = lot.download(kit.uri(bucket, "d/produced.bin"), str(tmp_path / "back.bin"), **options)
    down.order = Order.AFTER

    @ct.electron(files=[up, down], call_before=[ct.DepsCall(start_debug_log, args=[str(log_path)])],
                 call_after=[ct.DepsCall(stop_debug_log)])
    def produce(files=[]):
        with open(local, "wb") as f:
            f.write(os.urandom(2 * MiB))
        return "done"

    @ct.lattice
    def flow():
        return produce()

    dispatch_id = ct.dispatch(flow)()
    result = ct.get_result(dispatch_id, wait=True, intermediate_outputs=False)
    node = result.get_node_result(0)
    assert str(result.status) == "COMPLETED", (result.error, node.get("stderr"))
    assert (tmp_path / "back.bin").read_bytes() == Path(local).read_bytes()
    debug = log_path.read_text()
    assert "covalent_lot INFO" in debug and " DEBUG " in debug, debug[-2000:]
    scanned = assert_clean(debug, secrets, "the worker's DEBUG log")
    scanned += assert_clean(f"{node.get('stdout')}\n{node.get('stderr')}", secrets, "the node's output")
    for path in sorted((lot_session_dir / "covalent").rglob("*")):
        if path.is_file():
            scanned += assert_clean(path.read_bytes(), secrets, f"Covalent's {path}")
    print(f"\n{kit.name}: {len(secrets)} secrets, {scanned:,} bytes of logs and Covalent files clean")
