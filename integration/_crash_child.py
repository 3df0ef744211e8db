"""One covalent-lot transfer in a process of its own, for test_crash.py to kill.

    python _crash_child.py '{"action": "put"|"get", "uri": ..., "local": ..., "options": {...}}'

The strategy is built with ``covalent_lot.strategy_for(uri, **options)``,
credentials coming from the environment as on an executor. Lines on stdout
tell the parent how far it got, so that it can strike while bytes move:

    ready                  strategy built, SDK imported; the transfer starts
    moved <bytes>          bytes moved so far, whenever the count grows
    done <stats json>      finished
    error <type> <message> failed with that exception (exit status 1)

Progress comes from /proc/self/io, which leaves the transfer itself
untouched (no hooks, no wrappers: the code path of production). Socket
sends and receives are not counted there, file reads and writes are: a
download has moved what it wrote; an upload has moved about what it read of
the source beyond the one whole read of the checksum pass.
"""

from __future__ import annotations

import json
import os
import sys
import threading

POLL_SECONDS = 0.01


def _io_count(field: str) -> int:
    """'rchar' or 'wchar' of this process: bytes through read/write calls."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/io")


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report_progress(field: str, start: int, stop: threading.Event) -> None:
    last = 0
    while not stop.wait(POLL_SECONDS):
        moved = _io_count(field) - start
        if moved > last + 4096:  # our own reads and lines count too: ignore those
            _say(f"moved {moved}")
            last = moved


def main(spec: dict) -> int:
    import covalent_lot

    strategy = covalent_lot.strategy_for(spec["uri"], **spec["options"])
    _say("ready")
    if spec["action"] == "put":
        from covalent_lot._stream import recorded_checksum

        # The checksum pass reads the whole file, unless the file carries the
        # checksum recorded when an earlier test uploaded it.
        hashed = recorded_checksum(spec["local"]) is None
        field, start = "rchar", _io_count("rchar") + (os.path.getsize(spec["local"]) if hashed else 0)
    else:
        field, start = "wchar", _io_count("wchar")
    stop = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(field, start, stop), daemon=True)
    reporter.start()
    try:
        try:
            if spec["action"] == "put":
                stats = strategy.put(spec["local"], spec["uri"])
            else:
                stats = strategy.get(spec["uri"], spec["local"])
        finally:
            stop.set()  # the outcome must be the last line
            reporter.join()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        kind = type(exc)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        _say(f"error {kind.__module__}.{kind.__qualname__} {first_line}")
        return 1
    _say("done " + json.dumps({"files": stats.files, "bytes": stats.bytes, "verified": stats.verified,
                               "retries": stats.retries, "seconds": round(stats.seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
