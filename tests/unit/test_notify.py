"""`Signal`: producers fire it from the loop or from a worker thread; the listener runs on the loop."""

from __future__ import annotations

import asyncio
import threading

from gateway.notify import Signal


def test_a_fire_from_a_worker_thread_runs_the_listener_on_the_loop() -> None:
    signal = Signal("test")
    ran_on: list[int] = []
    signal.listen(lambda: ran_on.append(threading.get_ident()))

    async def main() -> None:
        signal.bind(asyncio.get_running_loop())
        signal.fire()  # on the loop: at once
        assert ran_on == [threading.get_ident()]
        worker = threading.Thread(target=signal.fire)  # as the catalog writer does
        worker.start()
        worker.join()
        for _ in range(100):
            if len(ran_on) == 2:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(ran_on) == 2 and ran_on[0] == ran_on[1]  # both on the loop's thread


def test_before_bind_and_after_the_loop_closed_a_fire_reaches_nobody() -> None:
    signal = Signal("test")
    calls: list[str] = []
    signal.listen(lambda: calls.append("x"))
    signal.fire()  # not started: nobody waits yet

    async def main() -> None:
        signal.bind(asyncio.get_running_loop())

    asyncio.run(main())
    signal.fire()  # the server is gone: no error either
    assert calls == []
