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
