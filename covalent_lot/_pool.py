"""Bounded parallelism and stall detection: the one worker pool of the package.

Every place that moves several things at once (the files of a folder, the
blocks of an upload, the channels of an SFTP transfer, the items of a CLI
command) runs them through :func:`run_bounded`: at most ``workers`` at a time,
no new item after the first failure, the first failure raised in the caller.
A :class:`Watchdog` ends a run whose workers stopped hearing from the service.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, TypeVar

__all__ = ["run_bounded", "Watchdog"]

T = TypeVar("T")
R = TypeVar("R")


class Watchdog:
    """Notices when nothing was heard from a service for ``timeout`` seconds.

    Workers call :meth:`beat` whenever a reply arrives. A blocked read times
    out by itself, but a write can block for good on a socket the server
    stopped reading from; whoever waits for the workers asks :attr:`stalled`
    and then breaks the connection (``on_stall``) so that the write fails.
    """

    def __init__(self, timeout: float, what: str):
        self.timeout = timeout
        self.what = what
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    @property
    def stalled(self) -> bool:
        return time.monotonic() - self._last > self.timeout

    def error(self) -> TimeoutError:
        return TimeoutError(f"no reply in {self.timeout} s for {self.what}")


def run_bounded(items: Iterable[T], fn: Callable[[T], R], workers: int, *,
                name: str = "covalent-lot", watchdog: Watchdog | None = None,
                on_stall: Callable[[], None] | None = None) -> list[R]:
    """``fn(item)`` for every item, at most ``workers`` at once; results in item order.

    After a failure no new item starts; those running finish, and the first
    error is raised here. With a ``watchdog``, a run that stalls fails with
    its TimeoutError after ``on_stall()`` broke whatever the workers wait on.
    With one worker (or one item) everything runs in the calling thread.
    """
    items = list(items)
    results: list = [None] * len(items)
    workers = max(1, min(workers, len(items)))
    if workers == 1 and watchdog is None:
        for i, item in enumerate(items):
            results[i] = fn(item)
        return results
    backlog = iter(enumerate(items))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                i, item = next(backlog, (None, None))
            if i is None:
                return
            try:
                results[i] = fn(item)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                with lock:
                    errors.append(exc)
                return

    threads = [threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    stalled = False
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2 if watchdog is not None else None)
            if watchdog is not None and not stalled and watchdog.stalled:
                stalled = True
                with lock:
                    errors.insert(0, watchdog.error())
                if on_stall is not None:
                    on_stall()
    if errors:
        raise errors[0]
    return results
