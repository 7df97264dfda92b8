"""Which adapters sit in the model's slots: loaded on first use, at most ``max_loaded`` at once, the least recently
used one that no request is using unloaded first.

A request counts on an adapter (``in_use``) only once the adapter is resident, or from the moment its own load
starts: a request never holds a count while it waits, so a wait can only be for requests that are running, and
those finish. Waiting requests sleep on one change signal (a load ended, an adapter's last request ended) and
look again; a wait longer than ``slot_wait`` is a 503.
"""

from __future__ import annotations

import asyncio
import collections
import time

from tunesmith.errors import TunesmithError
from tunesmith.peft.io import read_adapter
from tunesmith.serve.registry import AdapterRegistry, ServeError


class ResidentAdapters:
    def __init__(self, model, slots, registry: AdapterRegistry, worker, engine, *, max_loaded: int,
                 slot_wait: float):
        self.model, self.slots, self.registry, self.worker, self.engine = model, slots, registry, worker, engine
        self.max_loaded, self.slot_wait = max_loaded, slot_wait
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently used first
        self.loading: set[str] = set()
        self.in_use: collections.Counter = collections.Counter()
        self._changed: asyncio.Event | None = None

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait(self, deadline: float) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ServeError(503, f"all {self.max_loaded} adapter slots serve running requests; retry",
                             kind="server_error", code="adapters_busy", headers={"Retry-After": "1"}) from None

    async def acquire(self, name: str | None) -> None:
        """Make sure adapter ``name`` is resident and count one more request on it (``release`` undoes)."""
        if name is None:
            return
        deadline = time.monotonic() + self.slot_wait
        adapter = None
        while True:  # no await between a look at the books and acting on it
            if name in self.loaded:
                self.in_use[name] += 1
                self.loaded.move_to_end(name)
                return
            if name not in self.loading:
                if adapter is None:  # read (and check) it first: a bad adapter fails at once, even when slots are busy
                    adapter = await self._read(name)
                    continue
                room = len(self.loaded) + len(self.loading) < self.max_loaded
                victim = None if room else next((n for n in self.loaded if self.in_use[n] <= 0), None)
                if room or victim is not None:
                    await self._load(name, adapter, victim)
                    return
            await self._wait(deadline)

    def release(self, name: str | None) -> None:
        if name is not None:
            self.in_use[name] -= 1
            if self.in_use[name] <= 0:
                self._signal()

    async def _read(self, name: str):
        path = self.registry.resolve(name)
        try:
            return await asyncio.to_thread(read_adapter, self.model, path)
        except TunesmithError as error:
            raise ServeError(400, f"adapter {name!r} cannot be loaded: {error}", code="adapter_load_failed") from None

    async def _load(self, name: str, adapter, victim: str | None) -> None:
        if victim is not None:
            del self.loaded[victim]  # from now on a request for it waits and loads it again
        self.loading.add(name)
        self.in_use[name] += 1

        def swap() -> None:
            if victim is not None:
                self.slots.unload(victim)
            self.slots.apply(name, adapter)
            self.engine.forget_prefixes()

        done = False
        try:
            await self._on_worker(swap)
            done = True
        except TunesmithError as error:
            raise ServeError(400, f"adapter {name!r} cannot be loaded: {error}", code="adapter_load_failed") from None
        finally:
            self.loading.discard(name)
            if done:
                self.loaded[name] = None
            else:
                self.in_use[name] -= 1
            self._signal()

    async def _on_worker(self, function):
        """Run ``function`` on the engine's thread. A request cancelled meanwhile still waits for it to end, so
        that the books always match the slots."""
        future = asyncio.wrap_future(self.worker.call(function))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    async def unload(self, name: str) -> bool:
        if name not in self.loaded:
            return False
        if self.in_use[name] > 0:
            raise ServeError(409, f"adapter {name!r} serves running requests", code="adapter_busy")
        del self.loaded[name]
        try:
            await self._on_worker(lambda: (self.slots.unload(name), self.engine.forget_prefixes()))
        finally:
            self._signal()
        return True
