"""Peak memory of a call, and of a TIES merge of K=48 synthetic experts (issue 9).

Run::

    .venv/bin/python benchmarks/peak_memory.py            # default threads, then 1 thread

prints ``mem_merge_ties_k48: peak=X.XX modules (A MB vs one module's deltas B MB)`` and the
same with ``_threads1``: the merge's peak resident memory above the baseline, in units of one
module's K stacked dense deltas (the largest module's ``K * d_out * d_in * 4`` bytes), the
unit the merge keeps its working memory in. ``bench_merge.py`` prints these lines too.

How memory is measured (tracemalloc does not see torch's allocations): glibc is told to
serve blocks >= 128 KiB by mmap and the heap is trimmed before the baseline, so freed
tensors leave the resident set; then the kernel's high-water mark of the resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) is read after the call. Where that
reset is not allowed, a thread samples the resident set every 5 ms instead (peaks shorter
than that can be missed).

The experts: 48 random rank-8 LoRAs on one transformer layer of SmolLM2-135M's shapes
(q/k/v/o 576 or 192 x 576, gate/up 1536 x 576, down 576 x 1536), held in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch

from lorafuse.library import LoraAdapter, LoraFactors
from lorafuse.merging import merge

MB = 2**20
SAMPLE_S = 0.005
K = 48
RANK = 8
LAYER_SHAPES = {  # module -> (d_out, d_in), SmolLM2-135M
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def configure_malloc() -> None:
    """Serve blocks >= 128 KiB by mmap (fixed threshold), so freed tensors leave the RSS."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixing it stops dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_reader() -> Callable[[], int]:
    """A function returning this process's resident set size in bytes (psutil or /proc)."""
    try:
        import psutil
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def from_proc() -> int:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * page

        return from_proc
    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


RSS = rss_reader()


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark() -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Yields a one-element list that holds, on exit, the peak RSS above the baseline in MB."""
    release_memory()
    baseline = RSS()
    out = [0.0]
    if _reset_high_water_mark():
        try:
            yield out
        finally:
            out[0] = max((_high_water_mark() or baseline) - baseline, 0) / MB
        return
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], RSS())
            stop.wait(SAMPLE_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], RSS())
        out[0] = max(peak[0] - baseline, 0) / MB


class SyntheticAdapter:
    """Random rank-``RANK`` factors for one layer's modules (what ``merge`` reads)."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.name = f"synthetic_{seed}"
        self.module_names = list(LAYER_SHAPES)
        self._factors = {
            m: LoraFactors(
                A=torch.randn(RANK, d_in, generator=gen) / d_in**0.5,
                B=torch.randn(d_out, RANK, generator=gen) / RANK**0.5,
                scaling=2.0,
            )
            for m, (d_out, d_in) in LAYER_SHAPES.items()
        }

    def factors(self, module: str) -> LoraFactors:
        return self._factors[module]


def module_deltas_mb(k: int = K) -> float:
    """One module's K stacked fp32 dense deltas (the largest module), in MB."""
    return max(k * d_out * d_in * 4 for d_out, d_in in LAYER_SHAPES.values()) / MB


def merge_peak_mb(adapters: Sequence[SyntheticAdapter], threads: int | None) -> float:
    """Peak RSS above baseline of a TIES merge (density 0.5, rank 16), in MB."""
    experts = cast(Sequence[LoraAdapter], adapters)
    merge(experts, "ties", progress=False, threads=threads, rank=16, density=0.5)  # warm-up
    with torch.no_grad(), peak_rss() as mem:
        merge(experts, "ties", progress=False, threads=threads, rank=16, density=0.5)
    return mem[0]


def report_merge_peak(threads: int | None = None) -> None:
    """Print the ``mem_merge_ties_k48`` line at ``threads`` (``None``: torch's count) and,
    unless that is 1, the ``_threads1`` line at 1 thread."""
    configure_malloc()
    adapters = [SyntheticAdapter(seed) for seed in range(K)]
    unit = module_deltas_mb()
    n = torch.get_num_threads() if threads is None else threads
    for suffix, count in [("", n)] + ([("_threads1", 1)] if n != 1 else []):
        peak = merge_peak_mb(adapters, count)
        print(
            f"mem_merge_ties_k{K}{suffix}: peak={peak / unit:.2f} modules "
            f"({peak:.1f} MB vs one module's deltas {unit:.1f} MB)",
            flush=True,
        )


if __name__ == "__main__":
    report_merge_peak()
