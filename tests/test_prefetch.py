import threading
import time

import pytest

from grounding.pipeline.prefetch import prefetch


def test_order_is_kept_whatever_finishes_first():
    def slow_first(x):
        time.sleep(0.02 if x % 3 == 0 else 0)
        return x * 10

    assert list(prefetch(range(30), slow_first, workers=4, ahead=8)) == [x * 10 for x in range(30)]


def test_bounded_lookahead():
    started = []
    lock = threading.Lock()

    def record(x):
        with lock:
            started.append(x)
        return x

    it = prefetch(iter(range(1000)), record, workers=2, ahead=5)
    assert next(it) == 0
    time.sleep(0.05)
    assert len(started) <= 6  # never more than `ahead` (+ the one handed out) submitted
    assert list(it) == list(range(1, 1000))


def test_errors_surface_in_order():
    def boom(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x

    it = prefetch(range(6), boom, workers=3, ahead=4)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)


def test_no_workers_is_plain_map():
    assert list(prefetch([1, 2, 3], str, workers=0)) == ["1", "2", "3"]


def test_inline_items_run_in_the_callers_thread():
    caller = threading.get_ident()
    where = {}

    def record(x):
        where[x] = threading.get_ident()
        return x

    out = list(prefetch(range(10), record, workers=2, ahead=3, inline=lambda x: x % 2 == 0))
    assert out == list(range(10))
    assert all((where[x] == caller) == (x % 2 == 0) for x in range(10))
