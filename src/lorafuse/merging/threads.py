"""Threads for merges: modules run concurrently, each single-threaded inside torch and BLAS.

A merge is a sequence of independent per-module jobs, each a chain of small tensor ops
(elementwise passes over one module's stacked deltas, k-th value selections, a Gram product
and a small eigensolve). Run with torch's intra-op threads, every one of those ops is a
fork-join region of torch's OpenMP team, and the Gram step hands over to a second pool
(OpenBLAS under NumPy/SciPy): on two cores the teams spin-wait for each other and for work
too small to split, and the merge ran about twice as slow with 2 threads as with 1 (issue
13; 10-20x slower on a machine busy with other work, where a descheduled team member stalls
every barrier). So :func:`map_in_order` runs each module whole on one thread instead, with
``threads`` modules in flight at a time: no barriers, no hand-offs, and more cores make
merges faster.

Results do not depend on ``threads``: every module is computed by the same single-threaded
code (bit-identical to ``threads=1``), and whatever is random is seeded per module.

torch's thread count is process-wide state (``torch.set_num_threads`` sets the calling
thread's OpenMP team size and the default of threads started later), and so is OpenBLAS's;
the helpers here set it for the duration of a ``with`` block or of an iteration and restore
it after.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "blas_limit",
    "blas_threads",
    "map_in_order",
    "resolve_threads",
    "single_threaded",
]

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-module working memory in flight (1 GiB)


def resolve_threads(threads: int | None) -> int:
    """``threads`` as a positive count; ``None`` means torch's current thread count."""
    if threads is None:
        return max(1, torch.get_num_threads())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


@functools.cache
def _threadpool_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an optional nicety: then BLAS keeps its own thread count
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def blas_limit(n: int) -> Iterator[None]:
    """NumPy's and SciPy's BLAS/LAPACK limited to ``n`` threads (threadpoolctl, if installed)."""
    controller = _threadpool_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=n, user_api="blas"):
        yield


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """torch (``torch.set_num_threads``) and the BLAS under NumPy/SciPy (threadpoolctl, where
    installed) limited to ``n`` threads inside the block; both restored after.

    Meant for the thread that coordinates the work: OpenBLAS's count is process-wide, so
    worker threads should not change it concurrently (:func:`map_in_order` sets it once).
    """
    n = resolve_threads(n)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with blas_limit(n):
            yield
    finally:
        torch.set_num_threads(before)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """``blas_threads(1)``: every op inside the block runs on the calling thread."""
    return blas_threads(1)


def _one_torch_thread() -> None:
    """Pool-thread initializer: this thread's torch ops run inline (no OpenMP team)."""
    torch.set_num_threads(1)


def map_in_order(
    fn: Callable[[T], R],
    items: Iterable[T],
    threads: int | None = None,
    *,
    cost: Callable[[T], int] | None = None,
    budget: int | None = None,
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """``fn(item)`` for each of ``items``, yielded in the order of ``items``.

    ``threads=1``: one item after another on the calling thread, single-threaded (see
    :func:`single_threaded`). More: a pool of ``threads`` workers, each single-threaded in
    torch, with BLAS limited to 1 thread while the iteration runs; ``None`` means torch's
    thread count. Items are taken from ``items`` (on the calling thread, lazily) only as room
    frees up: at most ``max_in_flight`` (default ``2 * threads``) are submitted and not yet
    yielded, and the sum of their ``cost(item)`` (bytes of working memory, say) stays within
    ``budget``, except that one item is always admitted when nothing else is in flight. So
    memory holds a bounded window of items whatever the length of ``items``.

    Thread counts are restored when the iteration ends or the iterator is closed. An
    exception in ``fn`` is raised here, at that item's turn; the items not yet started are
    cancelled.
    """
    n = resolve_threads(threads)
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if n == 1:
        with single_threaded():
            yield from _in_order(functools.partial(_run_now, fn), items, cost, budget, 1)
        return
    limit = max_in_flight or 2 * n
    before = torch.get_num_threads()
    try:
        with (
            blas_limit(1),
            ThreadPoolExecutor(
                n, thread_name_prefix="lorafuse-merge", initializer=_one_torch_thread
            ) as pool,
        ):
            yield from _in_order(functools.partial(pool.submit, fn), items, cost, budget, limit)
    finally:  # the workers' set_num_threads(1) also changed the default of new threads
        torch.set_num_threads(before)


def _run_now(fn: Callable[[T], R], item: T) -> Future[R]:
    """``fn(item)`` run here, as a finished future (an exception is raised at its turn)."""
    future: Future[R] = Future()
    try:
        future.set_result(fn(item))
    except Exception as exc:  # noqa: BLE001 - handed over like a pool's future
        future.set_exception(exc)
    return future


def _in_order(
    submit: Callable[[T], Future[R]],
    items: Iterable[T],
    cost: Callable[[T], int] | None,
    budget: int | None,
    limit: int,
) -> Iterator[R]:
    """Submit items while the window (``limit`` items, ``budget`` total cost) has room and
    yield the oldest one's result, in order. An item is read from ``items`` only when the
    count allows it; one that the budget does not admit yet is held (read, not started)."""
    pending: deque[tuple[Future[R], int]] = deque()
    in_flight_cost = 0
    source = iter(items)
    held: list[tuple[T, int]] = []  # an item read but not admitted yet, with its cost
    exhausted = False
    try:
        while True:
            while len(pending) < limit and not (exhausted and not held):
                if not held:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    held.append((item, cost(item) if cost is not None else 0))
                item, c = held[0]
                if pending and budget is not None and in_flight_cost + c > budget:
                    break
                held.clear()
                pending.append((submit(item), c))
                in_flight_cost += c
            if not pending:
                return
            future, c = pending.popleft()
            in_flight_cost -= c
            yield future.result()
    finally:
        for future, _ in pending:
            future.cancel()
