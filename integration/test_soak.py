"""CI soak: rounds of concurrent seed dispatches per backend, memory kept flat.

Per backend, ``LOT_SOAK_ROUNDS`` rounds (default 3) of 8 concurrent dispatches of
the seed lattice with 64 MiB each, through the private Covalent server; the
checks, clean-up and RSS samples are those of integration/soak.py (``make soak``,
the long run), which see.

Asserted per round: every dispatch completed, every consumer's sha256 equals its
producer's (all distinct), and the store holds exactly one object per dispatch
under ``soak/<dispatch_id>/`` (8 distinct per-dispatch prefixes, nothing else).
Asserted at the end: RSS after the last round <= RSS after the first + max(200
MiB, 50% of the first) for the Covalent server's process tree and this test
process, and the same with 512 MiB (one round's data) as a third candidate slack
for the backend's storage server (an emulator may hold a round's objects in
memory and free them lazily).

The RSS table is printed; the JSON is written to ``LOT_SOAK_OUT`` (a dir) when
set, else to the test's pytest tmp_path (pytest keeps the last few of those).
"""

from __future__ import annotations

import os
from pathlib import Path

from integration import soak

ROUNDS = int(os.environ.get("LOT_SOAK_ROUNDS", "3"))  # ~2.5 min for the 4 backends here
CONCURRENCY = 8
SIZE_MIB = 64


def test_soak_concurrent_seed_dispatches(covalent_server, kit, lot_session_dir, tmp_path, capsys):
    rows, problems = [], []
    for round_no in range(1, ROUNDS + 1):
        done = soak.run_round(kit, CONCURRENCY, SIZE_MIB)
        rows.append(soak.sample(round_no, done, kit, covalent_server, lot_session_dir))
        problems += [f"round {round_no}: {p}" for p in done.problems]
        if problems:
            break  # a broken round says enough; do not spend CI minutes on more
    out_dir = Path(os.environ.get("LOT_SOAK_OUT") or tmp_path) / kit.name
    settings = {"backend": kit.name, "rounds": ROUNDS, "concurrency": CONCURRENCY, "size_mib": SIZE_MIB}
    violations = soak.flatness_violations(rows)
    paths = soak.write_report(rows, out_dir, settings, problems, violations, plot=False)
    with capsys.disabled():
        print(f"\nsoak {kit.name}:\n{soak.table(rows)}\n({paths[0]})")
    assert not problems
    assert not violations
