"""One strategy instance used from many threads at once, against every real server.

Covalent may run several electrons' transfers in threads of one worker, and
users call ``put``/``get`` from their own thread pools. Here 8 threads each
move their own file and folder (several parts per file: multipart, resumable
chunks, blocks, SFTP channels) up and down through ONE strategy, while 4 more
download one shared object, to paths of their own and all to the same path.
Every byte is checked by sha256, every stats object counts only its own
transfer, and each key holds the checksum of its own bytes (no cross-talk).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from pathlib import Path

from covalent_lot._stream import sha256_file
from integration._kits import crc32c_of, is_sidecar, sha256_bytes, stored_checksum

OWNERS = 8
READERS = 4
MiB = 1024 * 1024
WAIT = 240  # seconds for any thread's whole share of work

# Options that cut each file into several parts, and a file size above them.
PARTED = {
    "s3": ({"multipart_threshold": "5MiB", "multipart_chunksize": "5MiB"}, 5 * MiB + 64 * 1024),
    "gcs": ({"chunk_size": "1MiB"}, 3 * MiB),
    "azure": ({"max_block_size": "1MiB", "max_single_put_size": "1MiB"}, 3 * MiB),
    "sftp": ({"chunk_size": "1MiB"}, 3 * MiB),
}


def sha256(path) -> str:
    return sha256_file(str(path))[0]


def write(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def no_partials(root: Path) -> bool:
    return not any(".lot-partial-" in name for _, _, names in os.walk(root) for name in names)


class Owner:
    """Thread ``i``'s own file and folder: written, uploaded, downloaded, checked."""

    def __init__(self, i: int, root: Path, size: int):
        self.i = i
        self.src = root / f"src{i}"
        self.out = root / f"out{i}"
        # Distinct sizes: a stats object counting another thread's file shows.
        self.sizes = {"big.bin": size + i * 4099, "dir/a.bin": 100_000 + i, "dir/sub/b.bin": 7 * i}
        self.digests = {rel: write(self.src / rel, n) for rel, n in self.sizes.items()}

    def run(self, kit, strategy, bucket: str, start: threading.Barrier) -> None:
        prefix = f"t{self.i}/"
        start.wait()
        stats = [
            strategy.put(str(self.src / "big.bin"), kit.uri(bucket, prefix + "big.bin")),
            strategy.put(str(self.src / "dir"), kit.uri(bucket, prefix + "dir/")),
            strategy.get(kit.uri(bucket, prefix + "big.bin"), str(self.out / "big.bin")),
            strategy.get(kit.uri(bucket, prefix + "dir/"), str(self.out / "dir")),
        ]
        folder_bytes = self.sizes["dir/a.bin"] + self.sizes["dir/sub/b.bin"]
        assert [(s.files, s.bytes, s.verified) for s in stats] == [
            (1, self.sizes["big.bin"], 1), (2, folder_bytes, 2),
            (1, self.sizes["big.bin"], 1), (2, folder_bytes, 2),
        ], f"thread {self.i}: {stats}"
        got = {rel: sha256(self.out / rel) for rel in self.sizes}
        assert got == self.digests, f"thread {self.i} got other bytes"

    def expected_keys(self) -> dict[str, str]:
        return {f"t{self.i}/{rel}": digest for rel, digest in self.digests.items()}


def read_shared(kit, strategy, uri: str, root: Path, j: int, start: threading.Barrier) -> list[str]:
    """Reader ``j``: the shared object to its own path twice, then to the common path."""
    start.wait()
    digests = []
    for k in range(2):
        target = root / f"reader{j}" / f"{k}.bin"
        strategy.get(uri, str(target))
        digests.append(sha256(target))
    strategy.get(uri, str(root / "common" / "shared.bin"))
    return digests


def test_one_strategy_many_threads(kit, bucket, tmp_path):
    options, size = PARTED[kit.name]
    strategy = kit.strategy(**options)
    settings_before = strategy.settings.as_dict()
    owners = [Owner(i, tmp_path, size) for i in range(OWNERS)]
    shared_digest = write(tmp_path / "shared.bin", size)
    shared_uri = kit.uri(bucket, "shared.bin")
    strategy.put(str(tmp_path / "shared.bin"), shared_uri)

    start = threading.Barrier(OWNERS + READERS, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(OWNERS + READERS) as pool:
        owned = [pool.submit(owner.run, kit, strategy, bucket, start) for owner in owners]
        read = [pool.submit(read_shared, kit, strategy, shared_uri, tmp_path, j, start)
                for j in range(READERS)]
        for future in owned:
            future.result(timeout=WAIT)
        for future in read:
            assert future.result(timeout=WAIT) == [shared_digest] * 2

    assert sha256(tmp_path / "common" / "shared.bin") == shared_digest
    assert no_partials(tmp_path)
    assert strategy.settings.as_dict() == settings_before
    expected = {"shared.bin": shared_digest}
    for owner in owners:
        expected.update(owner.expected_keys())
    stored = [key for key in kit.list_keys(bucket) if not is_sidecar(key)]
    assert sorted(stored) == sorted(expected)  # nothing else, no partial uploads
    for key, digest in expected.items():
        assert stored_checksum(kit, bucket, key) == crc32c_of(kit.get_bytes(bucket, key)), key
        assert sha256_bytes(kit.get_bytes(bucket, key)) == digest, key
