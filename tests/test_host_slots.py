"""``--per-host`` slots shared by worker threads and event-loop tasks."""

from __future__ import annotations

import asyncio
import threading

from contentdownload.jobs.hosts import HostSlots, Slots


def test_threads_and_tasks_share_one_limit():
    slots = Slots(2)
    assert slots.acquire(timeout=0) and slots.acquire(timeout=0)
    assert not slots.acquire(timeout=0)  # both taken by threads

    async def main():
        task = asyncio.ensure_future(slots.acquire_async())
        await asyncio.sleep(0)
        assert not task.done()  # a task waits for a thread's slot too
        threading.Thread(target=slots.release).start()  # released from another thread
        await asyncio.wait_for(task, timeout=30)
        assert not slots.acquire(timeout=0)  # the slot went to the task, not back to the pool
        slots.release()
        slots.release()

    asyncio.run(main())
    assert slots.acquire(timeout=0) and slots.acquire(timeout=0) and not slots.acquire(timeout=0)


def test_a_task_cancelled_while_waiting_takes_no_slot():
    slots = Slots(1)

    async def main():
        await slots.acquire_async()
        waiting = asyncio.ensure_future(slots.acquire_async())
        after = asyncio.ensure_future(slots.acquire_async())
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.sleep(0)
        slots.release()  # goes past the cancelled waiter to the next one
        await asyncio.wait_for(after, timeout=30)
        assert waiting.cancelled()
        slots.release()

    asyncio.run(main())
    assert slots.acquire(timeout=0) and not slots.acquire(timeout=0)


def test_a_slot_handed_to_a_task_cancelled_meanwhile_goes_back():
    slots = Slots(1)

    async def main():
        await slots.acquire_async()
        waiting = asyncio.ensure_future(slots.acquire_async())
        await asyncio.sleep(0)
        slots.release()  # handed over (scheduled on the loop) ...
        waiting.cancel()  # ... while the task is cancelled
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert slots.acquire(timeout=0), "the slot of a cancelled task was lost"


def test_hosts_have_their_own_slots():
    hosts = HostSlots(1)
    assert hosts("http://a.example/x") is hosts("http://A.EXAMPLE:80/y")
    assert hosts("http://a.example/x").acquire(timeout=0)
    assert hosts("http://b.example/x").acquire(timeout=0)


def test_a_waiting_thread_gets_its_turn_while_tasks_keep_waiting():
    slots = Slots(1)
    got = threading.Event()

    async def main():
        await slots.acquire_async()
        tasks = [asyncio.ensure_future(slots.acquire_async()) for _ in range(3)]
        await asyncio.sleep(0)
        thread = threading.Thread(target=lambda: slots.acquire(timeout=30) and got.set())
        thread.start()
        while not slots._threads:  # the thread is waiting too
            await asyncio.sleep(0.001)
        slots.release()  # both wait: this turn is the thread's
        assert await asyncio.get_running_loop().run_in_executor(None, got.wait, 30)
        thread.join()
        assert not any(task.done() for task in tasks)
        slots.release()  # and the next is a task's
        done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        for task in tasks:
            task.cancel()

    asyncio.run(main())
