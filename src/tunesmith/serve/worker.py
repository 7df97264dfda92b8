"""The engine's thread: one loop steps the engine; everything that touches it (submit, cancel, adapter loads)
runs on that thread between steps, handed over as a function (``call``)."""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future


class Worker:
    def __init__(self, engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self.generated = 0  # tokens produced since start (counted by ``count``)
        self._recent: collections.deque = collections.deque()  # the times of the last minute's tokens
        self.thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=30)

    def call(self, function) -> Future:
        """Run ``function()`` on the engine's thread before its next step; the future holds its result."""
        future: Future = Future()
        self._commands.put((function, future))
        self._wake.set()
        return future

    def count(self, token: int) -> None:
        """Called (on the engine's thread) for every token produced."""
        now = time.monotonic()
        self.generated += 1
        self._recent.append(now)
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        return sum(1 for t in list(self._recent) if now - t <= window) / window

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            engine = self.engine
            if engine.running or engine.waiting:
                try:
                    engine.step()
                except Exception as error:  # a failed step fails the requests in flight, never the server
                    engine.abort(f"{type(error).__name__}: {error}"[:500])
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def _drain(self) -> None:
        while True:
            try:
                function, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(function())
            except BaseException as error:  # handed back to the caller
                future.set_exception(error)
