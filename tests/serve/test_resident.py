"""Adapter residency without HTTP: the real server's books and slots when loads wait for a free slot (issue 27).

The case CI once hung on: with every slot busy, a second request for an adapter that is being loaded must not
hold a count on it while it queues behind a load for a third adapter; that third load would then wait for a
request that waits for it."""

from __future__ import annotations

import asyncio

import pytest

from tunesmith.serve.launch import build_server
from tunesmith.serve.registry import ServeError


@pytest.fixture
def server(served_files, request):
    base, root, _ = served_files
    built = build_server(str(base), adapter_root=str(root), dtype="fp32", device="cpu", max_loaded=1,
                         slot_wait=getattr(request, "param", 60.0))
    built.worker.start()
    yield built
    built.worker.stop()


async def _settle():
    for _ in range(50):  # let every task run to its next wait (reads go through a thread)
        await asyncio.sleep(0.02)


def test_a_request_for_an_adapter_being_loaded_never_waits_behind_another_load(server):
    adapters = server.adapters

    async def scenario():
        await adapters.acquire("ad0")  # the only slot, busy
        first = asyncio.create_task(adapters.acquire("ad1"))
        await _settle()
        third = asyncio.create_task(adapters.acquire("ad2"))
        await _settle()
        second = asyncio.create_task(adapters.acquire("ad1"))
        await _settle()
        assert not (first.done() or second.done() or third.done())
        assert adapters.in_use["ad1"] == 0 and adapters.in_use["ad2"] == 0  # waiting holds no count
        adapters.release("ad0")
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert server.loaded == ["ad1"] and adapters.in_use["ad1"] == 2 and not third.done()
        assert list(server.slots.slots) == ["ad1"]
        adapters.release("ad1")
        await _settle()
        assert not third.done()  # one request still runs on ad1
        adapters.release("ad1")
        await asyncio.wait_for(third, 10)
        assert server.loaded == ["ad2"] and list(server.slots.slots) == ["ad2"] and adapters.in_use["ad2"] == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("server", [0.3], indirect=True)
def test_a_bad_name_fails_at_once_while_slots_are_busy_and_a_long_wait_is_a_503(server):
    adapters = server.adapters

    async def scenario():
        await adapters.acquire("ad0")
        with pytest.raises(ServeError) as missing:
            await asyncio.wait_for(adapters.acquire("no-such-adapter"), 5)
        assert missing.value.status == 404
        with pytest.raises(ServeError) as busy:
            await adapters.acquire("ad3")
        assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
        assert server.loaded == ["ad0"] and adapters.in_use["ad3"] == 0 and not adapters.loading

    asyncio.run(scenario())
