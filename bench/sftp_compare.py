#!/usr/bin/env python
"""SFTP speed: the strategy vs OpenSSH sftp/scp vs plain paramiko, on a private sshd.

    python bench/sftp_compare.py [MiB=512] [rounds=2]
    BENCH_VERIFY=1 adds the strategy with checksums on (the default);
    BENCH_OPTS='[{"max_concurrency": 8}]' tries strategy options; BENCH_ONLY=name filters.

Starts /usr/sbin/sshd on a free 127.0.0.1 port with its own keys in a temp dir;
prints the best of `rounds` per case, MiB/s.
"""
import os, shutil, subprocess, sys, tempfile, time, socket, json
from pathlib import Path
import paramiko

D = Path(tempfile.mkdtemp(prefix="lot-sftp-bench-"))
os.environ["HOME"] = str(D / "home")  # covalent writes its config on import: not in ~
MiB = 1 << 20
SIZE = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 512 * MiB
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
for k in ("host_key", "client_key"):
    if not (D / k).exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(D / k)], check=True)
(D / "authorized_keys").write_text((D / "client_key.pub").read_text())
s = socket.socket(); s.bind(("127.0.0.1", 0)); PORT = s.getsockname()[1]; s.close()
(D / "sshd_config").write_text(f"""Port {PORT}
ListenAddress 127.0.0.1
HostKey {D}/host_key
PidFile {D}/sshd.pid
AuthorizedKeysFile {D}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
os.makedirs("/run/sshd", exist_ok=True)
sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(D / "sshd_config")], stderr=subprocess.DEVNULL)
time.sleep(0.5)
hostpub = " ".join((D / "host_key.pub").read_text().split()[:2])
(D / "known_hosts").write_text(f"[127.0.0.1]:{PORT} {hostpub}\n")
src = D / "src.bin"
if not src.exists() or src.stat().st_size != SIZE:
    with open(src, "wb") as f:
        for _ in range(SIZE // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
R = D / "remote"; R.mkdir(exist_ok=True)
down = D / "down.bin"
SSH_OPTS = ["-i", str(D / "client_key"), "-o", f"UserKnownHostsFile={D}/known_hosts", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes"]

def timed(fn):
    for p in (R / "x.bin", down):
        if p.exists(): p.unlink()
    t = time.perf_counter(); fn(); return SIZE / MiB / (time.perf_counter() - t)

def openssh_sftp(direction, cipher=None):
    c = ["-c", cipher] if cipher else []
    batch = D / "batch"
    if direction == "up":
        batch.write_text(f"put {src} {R}/x.bin\n")
    else:
        batch.write_text(f"get {R}/x.bin {down}\n")
    subprocess.run(["sftp", "-q", "-b", str(batch), "-P", str(PORT), *SSH_OPTS, *c, "root@127.0.0.1"], check=True,
                   stdout=subprocess.DEVNULL)

def scp(direction, cipher=None):
    c = ["-c", cipher] if cipher else []
    a, b = (str(src), f"root@127.0.0.1:{R}/x.bin") if direction == "up" else (f"root@127.0.0.1:{R}/x.bin", str(down))
    subprocess.run(["scp", "-q", "-P", str(PORT), *SSH_OPTS, *c, a, b], check=True)

def paramiko_plain(direction, gcm=False):
    ssh = paramiko.SSHClient(); ssh.load_host_keys(str(D / "known_hosts"))
    kw = {}
    if gcm:
        def tf(sock, **k):
            t = paramiko.Transport(sock, **k)
            o = t.get_security_options(); o.ciphers = ("aes128-gcm@openssh.com",) + tuple(x for x in o.ciphers if x != "aes128-gcm@openssh.com")
            return t
        kw["transport_factory"] = tf
    ssh.connect("127.0.0.1", PORT, "root", key_filename=str(D / "client_key"), allow_agent=False, look_for_keys=False, **kw)
    sf = ssh.open_sftp()
    if direction == "up":
        sf.put(str(src), f"{R}/x.bin")
    else:
        sf.get(f"{R}/x.bin", str(down))
    ssh.close()

os.environ["COVALENT_LOT_SFTP_KEY_FILENAME"] = str(D / "client_key")
from covalent_lot.strategies.sftp import SFTPStrategy
import covalent_lot.strategies.sftp as M
if os.environ.get("MAXPKT"): M.CHANNEL_MAX_PACKET = int(os.environ["MAXPKT"])
if os.environ.get("WIN"): M.WINDOW_SIZE = int(os.environ["WIN"])
def strat(direction, **opt):
    s = SFTPStrategy(known_hosts=str(D / "known_hosts"), username="root", allow_agent=False, verify=False, **opt)
    uri = f"sftp://root@127.0.0.1:{PORT}{R}/x.bin"
    if direction == "up":
        s.put(str(src), uri)
    else:
        s.get(uri, str(down))

def stratv(direction, **opt):
    s = SFTPStrategy(known_hosts=str(D / "known_hosts"), username="root", allow_agent=False, **opt)
    uri = f"sftp://root@127.0.0.1:{PORT}{R}/x.bin"
    if direction == "up":
        s.put(str(src), uri)
    else:
        s.get(uri, str(down))

import logging; logging.getLogger("covalent_lot").setLevel(logging.WARNING)
import functools
cases = [
    ("OpenSSH sftp (default cipher)", functools.partial(openssh_sftp)),
    ("OpenSSH sftp -c aes128-gcm", functools.partial(openssh_sftp, cipher="aes128-gcm@openssh.com")),
    ("scp (default cipher)", functools.partial(scp)),
    ("paramiko put/get (defaults)", functools.partial(paramiko_plain)),
    ("paramiko put/get (gcm)", functools.partial(paramiko_plain, gcm=True)),
]
extra = json.loads(os.environ.get("BENCH_OPTS", "[{}]"))
for opt in extra:
    cases.append((f"strategy verify=off {opt}", functools.partial(strat, **opt)))
    if os.environ.get("BENCH_VERIFY"):
        cases.append((f"strategy verify=on {opt}", functools.partial(stratv, **opt)))
only = os.environ.get("BENCH_ONLY")
try:
    print(f"{SIZE // MiB} MiB, best of {ROUNDS}, MiB/s")
    for name, fn in cases:
        if only and only not in name: continue
        res = {}
        for d in ("up", "down"):
            if d == "down" and not (R / "x.bin").exists():
                fn("up")
            best = 0
            for _ in range(ROUNDS):
                if d == "down":
                    if down.exists(): down.unlink()
                    t = time.perf_counter(); fn("down"); v = SIZE / MiB / (time.perf_counter() - t)
                else:
                    v = timed(lambda: fn("up"))
                best = max(best, v)
            res[d] = best
        print(f"{name:60s} up {res['up']:7.1f}  down {res['down']:7.1f}", flush=True)
finally:
    sshd.terminate(); sshd.wait()
    shutil.rmtree(D, ignore_errors=True)
