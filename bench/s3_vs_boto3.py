#!/usr/bin/env python
"""S3 strategy vs plain boto3 with the same TransferConfig, same server, same file.

Starts a private SeaweedFS, then alternates plain boto3 (upload_file /
download_file) and the covalent-lot strategy (sha256 stored and verified) on
one file, and prints MiB/s for each and their ratio. The full benchmark suite
(`make bench`) comes with its own issue; this is the quick check.

    python bench/s3_vs_boto3.py [--mib 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    spec = importlib.util.spec_from_file_location("lot_servers", HERE.parent / "integration" / "_servers.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)

    work = Path(tempfile.mkdtemp(prefix="lot-bench-"))
    os.environ["HOME"] = str(work / "home")  # covalent's config goes here, not ~
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="benchsecret", AWS_DEFAULT_REGION="us-east-1")
    server = harness.SeaweedS3(work / "seaweed").start()
    try:
        import boto3
        from boto3.s3.transfer import TransferConfig

        from covalent_lot.strategies.s3 import S3Strategy

        strategy = S3Strategy(endpoint_url=server.endpoint)
        s = strategy.settings
        config = TransferConfig(multipart_threshold=s["multipart_threshold"],
                                multipart_chunksize=s["multipart_chunksize"],
                                max_concurrency=s["max_concurrency"])
        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket="bench")
        source = work / "source.bin"
        with open(source, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1024 * 1024))
        client.upload_file(str(source), "bench", "warm-up", Config=config)  # SeaweedFS grows volumes
        client.upload_file(str(source), "bench", "warm-up", Config=config)

        timings: dict[str, list[float]] = {k: [] for k in ("boto3 up", "lot up", "boto3 down", "lot down")}

        def timed(name, fn):
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)

        for i in range(args.rounds):
            timed("boto3 up", lambda: client.upload_file(str(source), "bench", f"plain/{i}", Config=config))
            timed("lot up", lambda: strategy.put(str(source), f"s3://bench/lot/{i}"))
            timed("boto3 down", lambda: client.download_file("bench", f"plain/{i}", str(work / "plain.out"), Config=config))
            timed("lot down", lambda: strategy.get(f"s3://bench/lot/{i}", str(work / "lot.out")))
        rate = {k: args.mib / statistics.median(v) for k, v in timings.items()}
        print(f"\n{args.mib} MiB, median of {args.rounds}, SeaweedFS on 127.0.0.1, "
              f"TransferConfig(multipart_threshold={s['multipart_threshold'] >> 20} MiB, "
              f"multipart_chunksize={s['multipart_chunksize'] >> 20} MiB, max_concurrency={s['max_concurrency']})\n")
        print("| direction | plain boto3 MiB/s | covalent-lot MiB/s (sha256 on) | ratio |")
        print("|---|---:|---:|---:|")
        for d in ("up", "down"):
            print(f"| {d} | {rate['boto3 ' + d]:.0f} | {rate['lot ' + d]:.0f} | {rate['lot ' + d] / rate['boto3 ' + d]:.2f} |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
