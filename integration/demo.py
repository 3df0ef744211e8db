#!/usr/bin/env python
"""`make demo`: the seed scenario for real, on local servers, next to by-value.

Starts SeaweedFS (an S3-compatible server, keys enforced) and a private
`covalent start` (config, database, results and logs in a temp dir), runs the
"Large Object Transfer" two-electron workflow with a 256 MiB numpy array through
covalent-lot (as a handoff, and with @lot.offload), then the same workflow passing
the array by value, prints them
with the transfer stats, and stops the servers. No cloud account, no manual step.

    python -m integration.demo [--mib 256] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from integration import _servers as harness

class PeakRSS:
    """Samples the resident memory of the server's process tree and of this process."""

    def __init__(self, harness, server_pgid: int, interval: float = 0.05):
        import psutil

        self._psutil = psutil
        self._harness = harness
        self._pgid = server_pgid
        self._interval = interval
        self._stop = threading.Event()
        self.worker_peak = 0  # largest single process of the server's tree (a dask worker runs the electron)
        self.tree_peak = 0  # the whole tree: dispatcher, dask scheduler, nannies, workers
        self.client_peak = 0
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.client_peak = max(self.client_peak, self._me.memory_info().rss)
                total = 0
                for proc in self._harness._group_members(self._pgid):
                    try:
                        rss = proc.memory_info().rss
                    except self._psutil.Error:
                        continue
                    total += rss
                    self.worker_peak = max(self.worker_peak, rss)
                self.tree_peak = max(self.tree_peak, total)
            except self._psutil.Error:
                pass
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="array size in MiB (default 256)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lot-demo-"))
    port = harness.free_port(avoid_offsets=())
    # Point covalent at a private config before anything imports it.
    for var in [v for v in os.environ if v.startswith("COVALENT_")]:
        del os.environ[var]
    os.environ.update(harness.covalent_client_env(work / "covalent", port))
    aws = {
        "AWS_ACCESS_KEY_ID": "lotdemoaccess",
        "AWS_SECRET_ACCESS_KEY": "lotdemosecret0123456789",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(work / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(work / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    os.environ.update(aws)

    s3 = covalent = None
    try:
        print(f"starting SeaweedFS and a private Covalent server under {work} ...", flush=True)
        s3 = harness.SeaweedS3(work / "seaweed", aws["AWS_ACCESS_KEY_ID"], aws["AWS_SECRET_ACCESS_KEY"]).start()
        lot_env = {"COVALENT_LOT_S3_ENDPOINT_URL": s3.endpoint, "COVALENT_LOT_S3_REGION_NAME": "us-east-1",
                   # handoff files below the demo's temp dir, removed with it
                   "COVALENT_LOT_STAGING_DIR": str(work / "staging")}
        os.environ.update(lot_env)
        covalent = harness.CovalentServer(work / "covalent", env_extra={**aws, **lot_env}, port=port).start()
        print(f"  S3 at {s3.endpoint} ({s3.start_seconds:.1f} s), Covalent at {covalent.url} "
              f"({covalent.start_seconds:.1f} s)\n", flush=True)
        return run_demo(harness, s3, covalent, args.mib)
    finally:
        if covalent is not None:
            covalent.stop()
        if s3 is not None:
            s3.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_demo(harness, s3, server, mib: int) -> int:
    import boto3
    import covalent as ct
    import numpy as np
    from covalent._shared_files import config as ct_config

    import covalent_lot as lot

    ct_config.reload_config()  # the server may have moved to another port
    bucket = "lot-demo"
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    client.create_bucket(Bucket=bucket)
    # A fresh SeaweedFS grows its first volumes on the first few hundred MiB
    # written (uploads run at ~half speed meanwhile); a cloud store has no such
    # cold start, so write that much once, untimed, before measuring.
    zeros = Path(server.workdir) / "warm-up.bin"
    with open(zeros, "wb") as f:
        f.truncate(256 * 1024 * 1024)  # sparse: streams zeros without holding them
    for i in range(2):
        client.upload_file(str(zeros), bucket, f"warm-up/{i}")
        client.delete_object(Bucket=bucket, Key=f"warm-up/{i}")
    zeros.unlink()
    n = mib * 1024 * 1024 // 8

    # --- the seed scenario with covalent-lot ------------------------------------------
    h = lot.handoff(f"s3://{bucket}/runs/{{dispatch_id}}/large_object.npy")

    @ct.electron(files=[h.upload()])
    def task_1(n: int, files=[]):
        large_object = np.random.default_rng(0).random(n)
        np.save(h.path, large_object)
        return float(large_object.sum())

    @ct.electron(files=[h.download()])
    def task_2(expected_sum: float, files=[]):
        x = np.load(h.path)
        return {"sum_half": float(x.sum()) / 2, "matches_producer": float(x.sum()) == expected_sum}

    @ct.lattice
    def workflow_2(n: int):
        return task_2(task_1(n))

    # --- the same two steps with offloaded values (return it, receive it), then by value
    def make_array(n: int):
        return np.random.default_rng(0).random(n)

    def half_sum(x):
        return {"sum_half": float(x.sum()) / 2}

    produce = ct.electron(lot.offload(to=f"s3://{bucket}/lot/")(make_array))
    consume = ct.electron(lot.offload(half_sum))

    @ct.lattice
    def offloaded(n: int):
        return consume(produce(n))

    make_by_value, sum_by_value = ct.electron(make_array), ct.electron(half_sum)

    @ct.lattice
    def by_value(n: int):
        return sum_by_value(make_by_value(n))

    # --- the floor: both electrons on this machine, passing a local file path -----------
    floor_dir = Path(server.workdir) / "floor"

    @ct.electron
    def save_local(n: int):
        path = str(floor_dir / f"{ct.get_context().dispatch_id}.npy")
        os.makedirs(floor_dir, exist_ok=True)
        np.save(path, np.random.default_rng(0).random(n))
        return path

    @ct.electron
    def load_local(path: str):
        return {"sum_half": float(np.load(path).sum()) / 2}

    @ct.lattice
    def local_path(n: int):
        return load_local(save_local(n))

    # Warm up every path once with a small array: imports in the workers, the
    # first volume SeaweedFS allocates. Both measured runs then start alike.
    for lattice in (workflow_2, offloaded, by_value, local_path):
        warm = ct.get_result(ct.dispatch(lattice)(1024), wait=True, intermediate_outputs=False)
        if str(warm.status) != "COMPLETED":
            print(f"warm-up failed: {warm.error}", file=sys.stderr)
            return 1

    workflows = (
        ("covalent-lot handoff (S3)", workflow_2),
        ("covalent-lot offload (S3)", offloaded),
        ("by value", by_value),
        ("local file path (floor, one machine only)", local_path),
    )
    rows = []
    for label, lattice in workflows:
        before = harness.dir_bytes(server.workdir)
        with PeakRSS(harness, server.pgid) as rss:
            started = time.perf_counter()
            dispatch_id = ct.dispatch(lattice)(n)
            result = ct.get_result(dispatch_id, wait=True, intermediate_outputs=False)
            wall = time.perf_counter() - started
        added = harness.dir_bytes(server.workdir) - before
        status = str(result.status)
        print(f"{label}: {status} in {wall:.1f} s -> {result.result}")
        if status != "COMPLETED":
            print(result.error or "", file=sys.stderr)
            return 1
        if lattice is workflow_2:
            for line in transfer_lines(server, dispatch_id):
                print(f"  {line}")
            print()
        rows.append((label, wall, rss.worker_peak, rss.tree_peak, rss.client_peak, added))

    MiB = 1024 * 1024
    print(f"\nseed scenario, {mib} MiB float64 array, producer -> consumer, one machine:\n")
    print("| workflow | wall s | worker peak RSS MiB | server tree peak RSS MiB | client peak RSS MiB | added under Covalent dirs MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, wall, worker, srv, client, added in rows:
        print(f"| {label} | {wall:.1f} | {worker / MiB:.0f} | {srv / MiB:.0f} | {client / MiB:.0f} | {added / MiB:.1f} |")
    handoff, offload_row, by_value_row, floor = rows
    print(f"\nhandoff wall time: {handoff[1] / by_value_row[1]:.2f}x by value, "
          f"{handoff[1] / floor[1]:.1f}x the local-path floor; worker peak RSS "
          f"{handoff[2] / by_value_row[2]:.2f}x by value; Covalent's own dirs grow "
          f"{handoff[5] / MiB:.1f} MiB instead of {by_value_row[5] / MiB:.0f} MiB.")
    print(f"offload wall time: {offload_row[1] / by_value_row[1]:.2f}x by value, "
          f"{offload_row[1] / floor[1]:.1f}x the local-path floor (the consumer on the "
          f"producer's machine reads its verified copy: no download).")
    return 0


def transfer_lines(server, dispatch_id: str) -> list[str]:
    """covalent-lot's stats lines from the electrons' logs (their captured stderr)."""
    lines = []
    for path in sorted(Path(server.workdir).rglob("*")):
        if dispatch_id in str(path) and path.is_file() and path.stat().st_size < 1_000_000:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            lines += re.findall(r"covalent-lot: ((?:upload|download) .*)", text)
    return sorted(set(lines))


if __name__ == "__main__":
    sys.exit(main())
