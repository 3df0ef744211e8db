"""COVALENT_LOT_TIMINGS: one JSON line of phase timings per TransferCall (bench/e2e.py reads them)."""

from __future__ import annotations

import json
import os
import time

import pytest

import covalent_lot as lot

from .lot_fakes import STORES, in_memory

URI = "s3://bkt/runs/{dispatch_id}/x.npy"


@pytest.fixture
def context():
    from covalent.executor.utils.context import set_context

    return set_context


def calls(tmp_path, store):
    STORES.pop(store, None)
    h = lot.handoff(URI, staging_dir=str(tmp_path / "staging"))
    pre_up, call_up = h.upload().cp()
    pre_down, call_down = h.download().cp()
    return h, pre_up, in_memory(call_up, store), pre_down, in_memory(call_down, store)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_one_line_per_call_with_its_phases(context, tmp_path, monkeypatch, request):
    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv("COVALENT_LOT_TIMINGS", str(timings))
    h, pre_up, call_up, pre_down, call_down = calls(tmp_path, request.node.nodeid)
    before = time.time()
    with context("d-1", 0):
        pre_up()
        local = h.path
        with open(local, "wb") as f:
            f.write(b"x" * 1000)
        call_up()
    with context("d-1", 1):
        pre_down()
        call_down()
    after = time.time()

    up, down = lines(timings)
    assert (up["action"], down["action"]) == ("upload", "download")
    # The placeholders filled as where the hook ran, and which task it was.
    assert up["source"] == local and up["destination"] == "s3://bkt/runs/d-1/x.npy"
    assert down["source"] == "s3://bkt/runs/d-1/x.npy"
    assert (up["dispatch_id"], up["node_id"], down["node_id"]) == ("d-1", "0", "1")
    assert up["pid"] == os.getpid() and up["error"] is None
    assert before <= up["start"] <= up["end"] <= down["start"] <= down["end"] <= after
    for record in (up, down):
        phases = record["phases"]
        assert {"load", "settings", "resolve", "build", "engine", "close", "keep_bounded"} <= set(phases)
        assert all(seconds >= 0 for seconds in phases.values())
        # The laps follow each other: together no longer than the call.
        assert sum(phases.values()) <= record["end"] - record["start"] + 1e-3
        assert isinstance(record["engine_phases"], dict)
    assert up["bytes"] == 1000 and up["files"] == 1


def test_engine_phases_are_recorded_when_the_engine_reports_them(context, tmp_path, monkeypatch, request):
    # TransferStats.phases (seconds per engine phase) where the engine has it.
    from covalent_lot import _strategy

    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv("COVALENT_LOT_TIMINGS", str(timings))
    real = _strategy.run_transfer

    def with_phases(*args, **kwargs):
        stats = real(*args, **kwargs)
        stats.phases = {"connect": 0.25, "hash": 0.5}
        return stats

    monkeypatch.setattr(_strategy, "run_transfer", with_phases)
    h, pre_up, call_up, _, _ = calls(tmp_path, request.node.nodeid)
    with context("d-2", 0):
        pre_up()
        with open(h.path, "wb") as f:
            f.write(b"y")
        call_up()
    assert lines(timings)[0]["engine_phases"] == {"connect": 0.25, "hash": 0.5}


def test_a_failed_transfer_is_recorded_and_still_raises(context, tmp_path, monkeypatch, request):
    timings = tmp_path / "timings.jsonl"
    monkeypatch.setenv("COVALENT_LOT_TIMINGS", str(timings))
    _, pre_up, call_up, _, _ = calls(tmp_path, request.node.nodeid)
    with context("d-3", 0):
        pre_up()
        with pytest.raises(FileNotFoundError):
            call_up()  # the producer wrote nothing
    (record,) = lines(timings)
    assert record["error"].startswith("FileNotFoundError")


def test_an_unwritable_timings_file_does_not_fail_the_transfer(context, tmp_path, monkeypatch, request):
    monkeypatch.setenv("COVALENT_LOT_TIMINGS", str(tmp_path / "no-such-dir" / "timings.jsonl"))
    h, pre_up, call_up, _, _ = calls(tmp_path, request.node.nodeid)
    with context("d-4", 0):
        pre_up()
        with open(h.path, "wb") as f:
            f.write(b"z")
        assert call_up().files == 1


def test_nothing_is_written_without_the_variable(context, tmp_path, monkeypatch, request):
    monkeypatch.delenv("COVALENT_LOT_TIMINGS", raising=False)
    from covalent_lot import _strategy

    made = []
    monkeypatch.setattr(_strategy, "PhaseClock", lambda: made.append(1))
    h, pre_up, call_up, _, _ = calls(tmp_path, request.node.nodeid)
    with context("d-5", 0):
        pre_up()
        with open(h.path, "wb") as f:
            f.write(b"z")
        assert call_up().files == 1
    assert made == []


def test_bench_gap_parts_add_up_to_the_gap():
    """bench/e2e.py's split of handoff wall - floor wall: named parts + unaccounted = gap;
    a phase run alongside another is shown, not summed."""
    from bench import e2e

    floor = {"workflow": e2e.FLOOR, "size_mib": 512, "backend": None, "wall_s": 4.0,
             "timeline": {"producer_start": 100.5, "producer_return": 101.5,
                          "consumer_start": 102.0, "consumer_return": 102.8}}
    phases = {"load": 0.01, "settings": 0.02, "resolve": 0.001, "build": 0.05, "close": 0.01, "keep_bounded": 0.05}
    handoff = {"workflow": e2e.HANDOFF, "size_mib": 512, "backend": "s3", "wall_s": 8.0,
               "timeline": {"producer_start": 200.5, "producer_return": 201.6,
                            "consumer_start": 206.0, "consumer_return": 206.8},
               "hooks": [{"action": "upload", "start": 201.7, "end": 204.7, "phases": {**phases, "engine": 2.8},
                          "engine_phases": {"connect": 0.1, "transfer": 2.6, "hash (alongside)": 1.0}},
                         {"action": "download", "start": 205.0, "end": 205.9, "phases": {**phases, "engine": 0.7},
                          "engine_phases": {"hash": 0.65}}]}
    rows = [floor, handoff]
    e2e._add_gaps(rows)
    gap = handoff["gap"]
    assert gap["gap"] == pytest.approx(4.0)
    assert sum(gap[k] for k, _ in e2e.GAP_PARTS) + gap["unaccounted"] == pytest.approx(4.0)
    assert gap["rest"] == pytest.approx(gap["rest_hooks"] + gap["rest_bodies"] + gap["rest_between"])
    assert gap["hash"] == pytest.approx(0.65) and gap["alongside"] == pytest.approx(1.0)
    assert gap["transfer"] == pytest.approx(2.6) and gap["client"] == pytest.approx(0.2)
    assert gap["hook_overhead"] == pytest.approx((201.7 - 201.6) + (206.0 - 205.9))
    head, lines, _, _ = e2e.gap_tables(rows, 512)
    assert lines[0][:4] == ["s3", "4.00", "8.00", "4.00"] and len(lines[0]) == len(head)


def test_bench_gap_without_hook_timings_says_why():
    from bench import e2e

    marks = {"producer_start": 1.0, "producer_return": 2.0, "consumer_start": 3.0, "consumer_return": 4.0}
    gap = e2e.explain_gap({"wall_s": 5.0, "timeline": marks, "hooks": []}, {"wall_s": 4.0, "timeline": marks})
    assert "COVALENT_LOT_TIMINGS" in gap["error"]
