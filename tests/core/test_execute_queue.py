"""The executor's writer queue: copies never hold computation back, computed bytes waiting are bounded, errors
surface."""

import threading
from concurrent.futures import Future

import pytest

from surgery.core import execute
from surgery.core.execute import _Pending


def test_copies_queue_without_waiting():
    q = _Pending()
    futures = [Future() for _ in range(50)]
    for f in futures:
        q.add(f, 0)  # copies: nothing is awaited, none is done
    assert len(q.jobs) == 50 and q.nbytes == 0
    for f in futures:
        f.set_result(None)
    q.drain(0)
    assert not q.jobs


def test_computed_bytes_waiting_are_bounded(monkeypatch):
    monkeypatch.setattr(execute, "PENDING_BYTES", 100)
    q = _Pending()
    first, second = Future(), Future()
    copy = Future()
    q.add(first, 80)
    q.add(copy, 0)
    assert len(q.jobs) == 2  # under the bound: no wait
    threading.Timer(0.05, first.set_result, (None,)).start()
    q.add(second, 80)  # 160 bytes would wait: the oldest job is awaited first
    assert first.done() and q.nbytes == 80
    big = Future()
    copy.set_result(None)
    second.set_result(None)
    q.add(big, 10_000)  # one job may exceed the bound on its own
    assert [f for f, _ in q.jobs] == [big] and not big.done()


def test_a_failed_write_is_raised_at_the_next_job():
    q = _Pending()
    bad = Future()
    q.add(bad, 0)
    bad.set_exception(OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        q.add(Future(), 0)
