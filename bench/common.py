"""What several benchmark scripts share: starting the integration kits, writing
a report's markdown, json and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from integration import _kits

LogFn = Callable[[str], None]


def start_kits(names: list[str], root: Path, log: LogFn) -> tuple[dict, dict]:
    """Start each backend's kit (integration's server and SDK client) under
    ``root/<name>``. A backend that cannot start is recorded and left out, the
    others still run. Returns ({name: started kit}, {name: why not})."""
    started: dict = {}
    errors: dict = {}
    for name in names:
        kit = None
        try:
            kit = _kits.kit_class(name)()
            t0 = time.monotonic()
            kit.start(Path(root) / name)
            started[name] = kit
            log(f"{name}: {kit.endpoint} up in {time.monotonic() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001 - skip the backend, keep the rest
            errors[name] = f"kit did not start: {type(exc).__name__}: {exc}"
            log(errors[name])
            stop_kit(kit)
    return started, errors


def stop_kit(kit) -> None:
    """Stop ``kit`` if its server got as far as being created; never raises (a
    failed start, or the end of a run, must not hide the error that matters)."""
    if kit is None or getattr(kit, "server", None) is None:
        return
    try:
        kit.stop()
    except Exception:  # noqa: BLE001
        pass


def write_report(out_dir: Path, stem: str, text: str, data: dict,
                 plots: dict[str, Callable[[Path], None]], log: LogFn) -> str:
    """``<stem>.md`` (``text``), ``<stem>.json`` (``data``) and each plot into
    ``out_dir``; returns ``text``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    for name, plot in plots.items():
        try:
            plot(out_dir / name)
        except Exception as exc:  # noqa: BLE001 - a plot must not lose the tables
            log(f"plot {name} failed: {type(exc).__name__}: {exc}")
    return text
