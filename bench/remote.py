#!/usr/bin/env python
"""The seed scenario across hosts, through covalent-ssh-plugin: `make bench-remote`.

A private `covalent start`, a storage server (SeaweedFS by default) and a second
host (integration/_host2.py: an sshd in its own mount namespace with a private
/tmp, its own HOME, venv with covalent-lot installed from this checkout,
covalent.conf and credentials), all on loopback. The producer makes a seeded
random float64 array of --size-mib MiB; the consumer reduces it to its sum and
checks it. Rows:

* ``by value, ssh -> ssh``: both electrons on the SSHExecutor; the array goes
  back to the dispatcher in the producer's result and out again in the
  consumer's inputs, as Covalent passes values;
* ``handoff, ssh -> ssh (same host)``: both on the SSHExecutor; the consumer finds
  the producer's verified file in the host's staging dir and moves no bytes;
* ``handoff, ssh -> local (across hosts)``: producer on the second host, consumer
  on the dispatcher's local executor: upload there, download here;
* ``handoff, local -> ssh (across hosts)``: the reverse;
* ``local path, ssh -> ssh (floor)``: the producer returns the path of its .npy
  file on the host and the consumer loads it (one host only; the lower bound).

``wall_s`` is ``ct.dispatch`` until the result is terminal (status polled every
0.1 s), best of --repeats after one untimed warm-up of every row on a small
array; ``producer_s``/``consumer_s`` are the nodes' own start-to-end times as the
server recorded them (file transfers included). Writes bench/results/remote.md,
remote.json and remote.png, and prints the table.

    python -m bench.remote [--size-mib 256] [--repeats 2] [--backend s3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (python bench/remote.py) rather than with -m: the repository
    # root makes the packages bench and integration importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import suite  # noqa: E402 - the environment isolation
from integration import _servers  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

MiB = 1024 * 1024
ROWS = (
    "by value, ssh -> ssh",
    "handoff, ssh -> ssh (same host)",
    "handoff, ssh -> local (across hosts)",
    "handoff, local -> ssh (across hosts)",
    "local path, ssh -> ssh (floor)",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def array_of(n: int):
    import numpy as np

    return np.random.default_rng(11).random(n)


def workflows(ssh, uri: str):
    """Each row's lattice, taking the element count."""
    import covalent as ct
    import numpy as np

    import covalent_lot as lot

    h = lot.handoff(uri)

    def produce_value(n):
        return array_of(n)

    def consume_value(x):
        return float(x.sum())

    def produce_file(n, files=[]):
        np.save(h.path, array_of(n))
        return n

    def consume_file(n, files=[]):
        return float(np.load(h.path).sum())

    def produce_path(n):
        path = os.path.join(tempfile.gettempdir(), f"lot-bench-{os.getpid()}-{time.time_ns()}.npy")
        np.save(path, array_of(n))
        return path

    def consume_path(path):
        try:
            return float(np.load(path).sum())
        finally:
            os.unlink(path)

    def pair(produce, consume, first, second, **files):
        p = ct.electron(produce, executor=first, **({"files": [h.upload()]} if files else {}))
        c = ct.electron(consume, executor=second, **({"files": [h.download()]} if files else {}))

        @ct.lattice(executor=ssh)
        def flow(n):
            return c(p(n))

        return flow

    return {
        ROWS[0]: pair(produce_value, consume_value, ssh, ssh),
        ROWS[1]: pair(produce_file, consume_file, ssh, ssh, files=True),
        ROWS[2]: pair(produce_file, consume_file, ssh, "local", files=True),
        ROWS[3]: pair(produce_file, consume_file, "local", ssh, files=True),
        ROWS[4]: pair(produce_path, consume_path, ssh, ssh),
    }


def timed(flow, n: int, timeout: float = 900.0) -> dict:
    import covalent as ct
    from covalent._shared_files.util_classes import RESULT_STATUS

    t0 = time.perf_counter()
    dispatch_id = ct.dispatch(flow)(n)
    deadline = time.monotonic() + timeout
    while not RESULT_STATUS.is_terminal(ct.get_result(dispatch_id, status_only=True)["status"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dispatch_id} not done after {timeout:.0f}s")
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    result = ct.get_result(dispatch_id, wait=False, intermediate_outputs=False)
    if str(result.status) != "COMPLETED":
        raise RuntimeError(f"{dispatch_id}: {result.status}: {result.error} "
                           f"{[result.get_node_result(i).get('error') for i in range(3)]}")
    seconds = {}
    for i in range(3):  # produce, the parameter n, consume
        node = result.get_node_result(i)
        name = str(node["node_name"])
        if name.startswith(("produce_", "consume_")):  # not the parameter node of n
            seconds[name.split("_")[0]] = (node["end_time"] - node["start_time"]).total_seconds()
    return {"wall_s": wall, "producer_s": seconds["produce"], "consumer_s": seconds["consume"],
            "sum": result.result}


def plot(rows: list[dict], path: Path, size_mib: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["row"] for r in rows][::-1]
    walls = [r["wall_s"] for r in rows][::-1]
    ax.barh(names, walls, color=["#888" if "value" in n else "#4a7" if "floor" in n else "#37c" for n in names])
    for y, w in enumerate(walls):
        ax.text(w, y, f" {w:.1f} s", va="center", fontsize=8)
    ax.set_xlim(0, max(walls) * 1.15)  # room for the labels
    ax.set_xlabel(f"wall seconds, {size_mib} MiB seed scenario (lower is better)")
    ax.set_title("covalent-ssh-plugin SSHExecutor, second host on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="s3", choices=suite.BACKENDS)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lot-bench-remote-"))
    suite.isolate_environment(work)
    servers = _servers
    from integration import _host2 as host_mod
    kit = server = host = None
    try:
        kit = suite.make_kit(args.backend)
        kit.start(work / "store")
        servers.apply_env(kit.env)
        port = servers.free_port(avoid_offsets=())
        os.environ.update(servers.covalent_client_env(work / "covalent", port))
        os.environ["COVALENT_LOT_STAGING_DIR"] = str(work / "staging")
        server = servers.CovalentServer(work / "covalent", env_extra=kit.env, port=port).start()
        host = host_mod.SecondHost(ROOT)
        host.configure(kit.env)
        host.start()
        host.install_ssh_config(server.home_dir)
        log(f"second host {host.mode}: venvs {host.venvs.seconds['total']:.1f}s; "
            f"covalent server on :{server.port}")

        import numpy as np

        bucket = kit.new_bucket()
        flows = workflows(host.executor(), kit.uri(bucket, "bench/{dispatch_id}/x.npy"))
        n = args.size_mib * MiB // 8
        expected = float(array_of(n).sum())
        for name, flow in flows.items():  # warm-up: imports, connections, first writes
            timed(flow, 1024)
            log(f"warm: {name}")
        runs: dict[str, list[dict]] = {name: [] for name in flows}
        order = list(flows)
        for repeat in range(args.repeats):
            for name in (order if repeat % 2 == 0 else order[::-1]):
                out = timed(flows[name], n)
                if not np.isclose(out["sum"], expected, rtol=0, atol=1e-6 * n):
                    raise AssertionError(f"{name}: sum {out['sum']} != {expected}")
                runs[name].append(out)
                log(f"{name}: {out['wall_s']:.2f}s (producer {out['producer_s']:.2f}s, "
                    f"consumer {out['consumer_s']:.2f}s)")
        rows = []
        floor = min(r["wall_s"] for r in runs[ROWS[4]])
        by_value = min(r["wall_s"] for r in runs[ROWS[0]])
        for name in flows:
            best = min(runs[name], key=lambda r: r["wall_s"])
            rows.append({"row": name, **{k: round(v, 3) for k, v in best.items() if k != "sum"},
                         "wall_s_all": [round(r["wall_s"], 3) for r in runs[name]],
                         "x_floor": round(best["wall_s"] / floor, 2),
                         "x_faster_than_by_value": round(by_value / best["wall_s"], 2)})
    finally:
        for thing in (host, server):
            if thing is not None:
                thing.stop()
        if kit is not None and getattr(kit, "server", None) is not None:
            kit.stop()
        shutil.rmtree(work, ignore_errors=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    header = (f"Seed scenario, {args.size_mib} MiB float64, {args.backend}, SSHExecutor "
              f"(covalent-ssh-plugin) to a second host ({host.mode}); best of {args.repeats}, "
              f"{dt.date.today().isoformat()}")
    lines = [header, "", "| workflow | wall s | producer s | consumer s | x floor | x faster than by value |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['wall_s']:.2f} | {r['producer_s']:.2f} | {r['consumer_s']:.2f} | "
                     f"{r['x_floor']:.2f} | {r['x_faster_than_by_value']:.2f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "remote.md").write_text(text)
    (RESULTS / "remote.json").write_text(json.dumps({"size_mib": args.size_mib, "backend": args.backend,
                                                     "mode": host.mode, "rows": rows}, indent=2))
    plot(rows, RESULTS / "remote.png", args.size_mib)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
