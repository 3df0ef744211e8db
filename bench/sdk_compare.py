#!/usr/bin/env python
"""Each backend's strategy vs its plain SDK with the same settings, same server, same file.

Starts SeaweedFS (S3), fake-gcs-server (GCS) and Azurite (Azure) on 127.0.0.1
through the integration kits, writes one random file, and times uploads and
downloads in fresh child processes, alternating strategy and plain SDK. Each
child reports its wall time and its own peak RSS (VmHWM) above its baseline
after imports. Prints a Markdown table. The full suite (`make bench`) comes
with its own issue; this is the quick side-by-side.

    python bench/sdk_compare.py [--mib 256] [--rounds 3] [--backends s3,gcs,azure]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KITS = {"s3": ("_kits", "S3Kit"), "gcs": ("_kit_gcs", "GCSKit"), "azure": ("_kit_azure", "AzureKit")}

CHILD = r'''
import json, os, sys, time
backend, mode, direction, uri, path = sys.argv[1:6]

def high_water_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

import covalent_lot
from covalent_lot._uri import parse_uri
strategy = covalent_lot.strategy_for(uri)          # settings from the environment
s = strategy.settings
loc = parse_uri(uri)
# Both sides build their SDK client inside the timed call, from a process whose
# imports are done: what an electron pays for one transfer.
def sdk_s3(direction):
    import boto3
    from boto3.s3.transfer import TransferConfig
    client = boto3.client("s3", endpoint_url=s["endpoint_url"], region_name=s["region_name"])
    config = TransferConfig(multipart_threshold=s["multipart_threshold"],
                            multipart_chunksize=s["multipart_chunksize"],
                            max_concurrency=s["max_concurrency"])
    if direction == "up":
        client.upload_file(path, loc.bucket, loc.key, Config=config)
    else:
        client.download_file(loc.bucket, loc.key, path, Config=config)

def sdk_gcs(direction):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client(project=s["project"], credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": s["endpoint"]})
    blob = client.bucket(loc.bucket).blob(loc.key, chunk_size=s["chunk_size"])
    if direction == "up":
        blob.upload_from_filename(path, checksum="crc32c", timeout=s["timeout"])
    else:
        blob.download_to_filename(path, checksum="crc32c", timeout=s["timeout"])

def sdk_azure(direction):
    from azure.storage.blob import BlobClient
    blob = BlobClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], loc.bucket, loc.key,
        max_block_size=s["max_block_size"], max_single_put_size=s["max_single_put_size"])
    if direction == "up":
        with open(path, "rb") as f:
            blob.upload_blob(f, overwrite=True, max_concurrency=s["max_concurrency"])
    else:
        with open(path, "wb") as f:
            blob.download_blob(max_concurrency=s["max_concurrency"]).readinto(f)

def lot(direction):
    if direction == "up":
        strategy.put(path, uri)
    else:
        strategy.get(uri, path)

run = lot if mode == "lot" else {"s3": sdk_s3, "gcs": sdk_gcs, "azure": sdk_azure}[backend]
if mode == "sdk":
    {"s3": lambda: __import__("boto3"), "gcs": lambda: __import__("google.cloud.storage"),
     "azure": lambda: __import__("azure.storage.blob")}[backend]()
base = high_water_mib()
started = time.perf_counter()
run(direction)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "base_mib": base, "peak_mib": high_water_mib()}))
'''


def load_kit(name: str):
    spec = importlib.util.spec_from_file_location("lot_it__kits", ROOT / "integration" / "_kits.py")
    kits = sys.modules.get("lot_it__kits")
    if kits is None:
        kits = importlib.util.module_from_spec(spec)
        sys.modules["lot_it__kits"] = kits
        spec.loader.exec_module(kits)
    module_name, class_name = KITS[name]
    return getattr(kits.load_sibling(module_name), class_name)()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default="s3,gcs,azure")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lot-bench-"))
    os.environ["HOME"] = str(work / "home")  # covalent's config goes here, not ~
    for var in [v for v in os.environ if v.startswith("COVALENT_") and not v.startswith("COVALENT_LOT_")]:
        del os.environ[var]
    source = work / "source.bin"
    with open(source, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(1024 * 1024))
    rows = []
    try:
        for name in args.backends.split(","):
            kit = load_kit(name)
            kit.start(work / name)
            try:
                for key, value in kit.env.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                bucket = kit.new_bucket()
                results: dict[tuple[str, str], list[dict]] = {}
                for i in range(args.rounds + 1):  # round 0 warms the server up, not counted
                    for direction in ("up", "down"):
                        for mode in ("sdk", "lot"):
                            uri = kit.uri(bucket, f"{mode}.bin")
                            path = str(source if direction == "up" else work / f"{mode}.out")
                            out = subprocess.run(
                                [sys.executable, "-c", CHILD, name, mode, direction, uri, path],
                                capture_output=True, text=True, timeout=600,
                            )
                            if out.returncode != 0:
                                raise RuntimeError(f"{name} {mode} {direction} failed:\n{out.stderr[-3000:]}")
                            if i:
                                results.setdefault((mode, direction), []).append(
                                    json.loads(out.stdout.strip().splitlines()[-1]))
                for direction in ("up", "down"):
                    rate = {}
                    extra = {}
                    for mode in ("sdk", "lot"):
                        runs = results[(mode, direction)]
                        rate[mode] = args.mib / statistics.median(r["seconds"] for r in runs)
                        extra[mode] = max(r["peak_mib"] - r["base_mib"] for r in runs)
                    rows.append((name, direction, rate["sdk"], rate["lot"], extra["sdk"], extra["lot"]))
            finally:
                kit.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.mib} MiB, median of {args.rounds} (after one warm-up round), fresh child process "
          "per transfer, servers on 127.0.0.1, same settings for both\n")
    print("| backend | direction | plain SDK MiB/s | covalent-lot MiB/s (sha256 on) | ratio "
          "| SDK peak RSS above baseline MiB | covalent-lot peak RSS above baseline MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, direction, sdk, lot, sdk_rss, lot_rss in rows:
        print(f"| {name} | {direction} | {sdk:.0f} | {lot:.0f} | {lot / sdk:.2f} | {sdk_rss:.0f} | {lot_rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
