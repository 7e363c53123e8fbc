"""Benchmark lorafuse's ``merge`` against PEFT's ``add_weighted_adapter`` on the default library.

Run::

    make bench                                   # = the next line (installs first)
    .venv/bin/python benchmarks/bench_merge.py   # all pairs: about 5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_merge.py --quick   # linear (r16, r64) and ties: ~2.5 min
    .venv/bin/python benchmarks/bench_merge.py --threads 1 --clock cpu   # on a busy machine
    .venv/bin/python benchmarks/bench_merge.py --methods ties,dare_ties  # some pairs only

Target: lorafuse is at least 3x faster than PEFT's ``svd`` / ``ties_svd`` at the same output
rank, with equal or lower reconstruction error.

Setup: the embedded SmolLM2-135M (fp32, offline) and the K=8 private experts of the default
library (r=8 on q/k/v/o/gate/up/down of layers 24-29: 42 modules). Each pair runs the same math
on both sides with the same weights (the lorafuse method's defaults: 1/K for linear and DARE
linear, 1 for TIES-style sums) and the same output rank (16; one extra pair at 64):

=============  =====================  ==========================================
lorafuse       PEFT combination_type  note
=============  =====================  ==========================================
linear         svd                    exact sum_k w_k delta_k, then rank-r SVD
ties           ties_svd               density 0.5, majority sign "total"
dare_linear    dare_linear_svd        density 0.5; random masks differ
dare_ties      dare_ties_svd          density 0.5; random masks differ
magnitude      magnitude_prune_svd    density 0.5
=============  =====================  ==========================================

Measured per pair, printed in this order (ratio = PEFT / lorafuse, so > 1 favours lorafuse):

* time: median of 3 timed calls (2 when the first takes over ``SLOW_S``), after one untimed
  warm-up call per side at the start of the run; the two sides' calls alternate (lorafuse,
  PEFT, lorafuse, ...), so load from other work drifting during the run hits both alike.
  Wall clock by default; ``--clock cpu`` times this process's CPU time instead, which other
  processes on a busy machine barely disturb (use it with ``--threads 1``: with more
  threads, spin-waiting counts as CPU time). Loading is excluded from both: PEFT's 8
  adapters sit in the PeftModel, lorafuse's factors are read into memory beforehand (``merge``
  on a library reads them from disk, about 0.3 s more). PEFT's time includes creating the new
  adapter's layers; the adapter is deleted, untimed, after each call. PEFT does a full SVD
  (its default ``svd_full_matrices=True``); lorafuse's dense methods use their default
  ``svd="gram"``: the exact top-r singular triplets from the eigendecomposition of the
  smaller Gram matrix in float64 (same truncation as the full SVD to rounding: the error
  lines show it), and linear compresses in factor space without a dense matrix.
* memory: peak RSS above the pre-call baseline during each side's first timed call
  (``peak_memory.peak_rss``: the kernel's high-water mark, or 5 ms samples where that cannot
  be reset; tracemalloc does not see torch allocations); the lorafuse denominator of the
  ratio is floored at ``MIN_MB``.
* error: relative Frobenius error over all modules, ``sqrt(sum_m |ref_m - approx_m|^2) /
  sqrt(sum_m |ref_m|^2)``, against the full-rank result of the same math. Dense results are
  recorded during the last timed call (the input of the final SVD on each side); linear's is
  the exact ``sum_k w_k delta_k`` from the factors. For linear, TIES and magnitude the
  reference is lorafuse's uncompressed result (PEFT's own is checked to equal it). For DARE each
  side is compared with its own uncompressed result, since the random masks differ.

Each pair runs twice in one run: at ``--threads`` (default: torch's thread count, the
cores), then at 1 thread, whose lines end in ``_threads1``; PEFT gets the same torch thread
count, and lorafuse's ``merge`` uses it as its number of concurrent modules (each module on
one thread; its results do not depend on it). On a machine whose cores are busy with other
work, PEFT's OpenMP threads that spin-wait for each other can make small ops 10-100x slower
(a warning is printed when the load average exceeds the core count); compare the
``_threads1`` lines there. Last, ``peak_memory.py``'s lines: the peak memory of a TIES merge
of K=48 synthetic experts, in modules' stacked deltas (``--no-memory`` skips them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peak_memory import configure_malloc, peak_rss, report_merge_peak
from peft_side import PeftRunner, load_peft_model, patched

from lorafuse.library import LoraAdapter, LoraFactors, open_library
from lorafuse.merging import get_method, merge
from lorafuse.merging.merge import module_seed
from lorafuse.models import load_base_model

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "lorafuse" / "data" / "default_library"
DENSITY = 0.5
SLOW_S = 5.0  # a first timed call slower than this gets 2 timed repeats instead of 3
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]  # set by --clock
MIN_MB = 0.1
# the module: attribute access ``lorafuse.merging.merge`` gives the re-exported function
lorafuse_merge = importlib.import_module("lorafuse.merging.merge")


@dataclass(frozen=True)
class Pair:
    """One comparison: a lorafuse method and the PEFT combination type with the same math."""

    method: str
    peft_type: str
    rank: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"merge_{self.method}_r{self.rank}_vs_peft_{self.peft_type}"


@dataclass
class Result:
    pair: Pair
    lf_s: float
    peft_s: float
    lf_mb: float
    peft_mb: float
    lf_err: float
    peft_err: float


PAIRS = [
    Pair("linear", "svd", 16),
    Pair("ties", "ties_svd", 16, {"density": DENSITY}),
    Pair("dare_linear", "dare_linear_svd", 16, {"density": DENSITY}),
    Pair("dare_ties", "dare_ties_svd", 16, {"density": DENSITY}),
    Pair("magnitude", "magnitude_prune_svd", 16, {"density": DENSITY}),
    Pair("linear", "svd", 64),
]
QUICK_METHODS = {"linear", "ties"}


# ----------------------------------------------------------------------------- inputs
class InMemoryAdapter:
    """An adapter's factors read into memory up front: what ``merge`` needs, without disk I/O."""

    def __init__(self, adapter: LoraAdapter) -> None:
        self.name = adapter.name
        self.module_names = list(adapter.module_names)
        self._factors = {m: adapter.factors(m) for m in self.module_names}

    def factors(self, module: str) -> LoraFactors:
        return self._factors[module]


# ----------------------------------------------------------------------------- measuring
@dataclass
class Measured:
    seconds: float  # median over the timed calls
    peak_mb: float  # peak RSS above baseline during the first timed call
    output: Any  # what the last call returned
    dense: dict[str, torch.Tensor]  # uncompressed results recorded during the last call


@dataclass
class Side:
    """One side of a pair: how to call it, clean up after a call and record dense results."""

    call: Callable[[], Any]
    cleanup: Callable[[Any], None]
    recording: Callable[[], contextlib.AbstractContextManager[dict[str, torch.Tensor]]]


def measure(sides: Sequence[Side]) -> list[Measured]:
    """Per side, the median of 3 timed calls (2 if its first takes over ``SLOW_S``).

    The sides' calls are interleaved (first calls of all sides, then second calls, ...), so
    that load from other work on the machine drifting during the run hits all sides alike.
    RSS is sampled during each side's first call and the uncompressed results are recorded
    during its last one. ``cleanup`` runs, untimed, after every call but the last, whose
    output is returned (the caller cleans it up).
    """
    outs: list[Any] = []
    times: list[list[float]] = []
    peaks: list[float] = []
    for side in sides:
        with peak_rss() as mem:
            start = CLOCK()
            outs.append(side.call())
            times.append([CLOCK() - start])
        peaks.append(mem[0])
    repeats = [2 if t[0] > SLOW_S else 3 for t in times]
    dense: list[dict[str, torch.Tensor]] = [{} for _ in sides]
    for i in range(1, max(repeats)):
        for j, side in enumerate(sides):
            if i >= repeats[j]:
                continue
            side.cleanup(outs[j])
            outs[j] = None
            last = i == repeats[j] - 1
            with side.recording() if last else contextlib.nullcontext({}) as recorded:
                start = CLOCK()
                outs[j] = side.call()
                times[j].append(CLOCK() - start)
            dense[j] = recorded
    return [
        Measured(statistics.median(t), peak, out, d)
        for t, peak, out, d in zip(times, peaks, outs, dense, strict=True)
    ]


def rel_error(refs: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    """``sqrt(sum |ref - approx|^2) / sqrt(sum |ref|^2)`` over all modules, in float64."""
    num = den = 0.0
    for module, ref in refs.items():
        r = ref.double()
        num += float(torch.linalg.matrix_norm(r - approx[module].double()) ** 2)
        den += float(torch.linalg.matrix_norm(r) ** 2)
    return math.sqrt(num / den)


# ----------------------------------------------------------------------------- lorafuse side
class LorafuseRunner:
    """Runs ``merge`` on in-memory adapters and records dense methods' uncompressed results."""

    def __init__(self, adapters: Sequence[InMemoryAdapter]) -> None:
        self.adapters = adapters
        self.modules = adapters[0].module_names
        # merge only uses module_names and factors(), which InMemoryAdapter provides
        self._as_adapters = cast(Sequence[LoraAdapter], adapters)

    def call(self, pair: Pair, weights: list[float]) -> dict[str, LoraFactors]:
        return merge(
            self._as_adapters, pair.method, weights, progress=False, rank=pair.rank, **pair.params
        )

    @contextlib.contextmanager
    def recording(self, pair: Pair) -> Iterator[dict[str, torch.Tensor]]:
        """Record the dense delta each module hands to ``compress_dense`` (dense methods),
        told apart by the per-module seed it gets (modules finish in any order)."""
        seen: dict[int, torch.Tensor] = {}
        compress = lorafuse_merge.compress_dense

        def keep(delta: torch.Tensor, *args: Any, seed: int = 0, **kwargs: Any) -> LoraFactors:
            seen[seed] = delta  # dict item assignment is atomic
            return compress(delta, *args, seed=seed, **kwargs)

        recorded: dict[str, torch.Tensor] = {}
        with patched(lorafuse_merge, "compress_dense", keep):
            yield recorded
        if seen:
            seed = pair.params.get("seed", 0)
            recorded.update({m: seen[module_seed(seed, m)] for m in self.modules})

    def reference(self, pair: Pair, weights: list[float]) -> dict[str, torch.Tensor]:
        """A factor-space method's exact result per module (cheap: B @ A per module)."""
        spec = get_method(pair.method)
        kwargs = spec.parse_params(pair.params).model_dump()
        for key in ("rank", "svd", "svd_niter", "energy", "max_rank"):  # driver settings
            kwargs.pop(key, None)
        return {
            m: spec.fn([a.factors(m) for a in self.adapters], weights, **kwargs).delta()
            for m in self.modules
        }


# ----------------------------------------------------------------------------- one pair
def run_pair(pair: Pair, lorafuse: LorafuseRunner, peft: PeftRunner) -> Result:
    weights = get_method(pair.method).default_weight_list(len(lorafuse.adapters))
    log(f"{pair.name} ...")
    lf, pf = measure(
        [
            Side(
                lambda: lorafuse.call(pair, weights),
                lambda _: None,
                lambda: lorafuse.recording(pair),
            ),
            Side(lambda: peft.call(pair, weights), peft.delete, peft.recording),
        ]
    )
    lf_refs = lf.dense or lorafuse.reference(pair, weights)
    lf_err = rel_error(lf_refs, {m: f.delta() for m, f in lf.output.items()})
    peft_out = peft.deltas(pf.output, lorafuse.modules)
    peft.delete(pf.output)
    if pair.method.startswith("dare"):  # own random masks: compare with its own dense result
        peft_err = rel_error(pf.dense, peft_out)
    else:
        check_same_math(pair, lf_refs, pf.dense)
        peft_err = rel_error(lf_refs, peft_out)
    return Result(pair, lf.seconds, pf.seconds, lf.peak_mb, pf.peak_mb, lf_err, peft_err)


def check_same_math(
    pair: Pair, refs: dict[str, torch.Tensor], peft_dense: dict[str, torch.Tensor]
) -> None:
    """Warn if PEFT's uncompressed merge is not lorafuse's (same math, up to rounding)."""
    diff = rel_error(refs, peft_dense)
    if diff > 1e-5:
        log(f"WARNING {pair.name}: uncompressed results differ (relative {diff:.2e})")


def warm_up(lorafuse: LorafuseRunner, peft: PeftRunner) -> None:
    """One untimed call on each side (first-call costs: thread pools, allocator, kernels)."""
    pair = PAIRS[0]
    weights = get_method(pair.method).default_weight_list(len(lorafuse.adapters))
    lorafuse.call(pair, weights)
    peft.delete(peft.call(pair, weights))


# ----------------------------------------------------------------------------- main
def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ratio(peft_value: float, lf_value: float, floor: float = 1e-9) -> float:
    return peft_value / max(lf_value, floor)


def report(runs: Sequence[tuple[str, Sequence[Result]]]) -> None:
    """Each run's lines (names end with the run's suffix): times, then memory, then errors."""
    for suffix, results in runs:
        for r in results:
            speed = ratio(r.peft_s, r.lf_s)
            name = r.pair.name + suffix
            print(f"{name}: ratio={speed:.2f} ({r.lf_s:.2f} s vs {r.peft_s:.2f} s)")
    for suffix, results in runs:
        for r in results:
            mem = ratio(r.peft_mb, r.lf_mb, MIN_MB)
            name = r.pair.name + suffix
            print(f"mem_{name}: ratio={mem:.2f} ({r.lf_mb:.1f} MB vs {r.peft_mb:.1f} MB)")
    for suffix, results in runs:
        for r in results:
            name = r.pair.name + suffix
            print(f"err_{name}: lorafuse_err={r.lf_err:.4e} peft_err={r.peft_err:.4e}")


def warn_if_busy(threads: int) -> None:
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > cores:
        hint = " (try --threads 1)" if threads > 1 else ""
        log(
            f"note: load average {load:.1f} > {cores} cores; with --threads {threads} "
            f"timings may be distorted by other work{hint}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only linear and ties")
    parser.add_argument(
        "--methods", default=None, help="comma-separated lorafuse methods to run (default all)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"threads of the first run (default torch's: {torch.get_num_threads()}); a "
        "second run at 1 thread follows, its lines suffixed _threads1",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the K=48 peak-memory lines")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="time calls by wall clock (default) or by this process's CPU time (with "
        "--threads 1 on a machine busy with other work)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    global CLOCK
    args = parse_args(argv)
    CLOCK = CLOCKS[args.clock]
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    configure_malloc()
    warn_if_busy(args.threads)
    pairs = [p for p in PAIRS if not args.quick or p.method in QUICK_METHODS]
    if args.methods:
        pairs = [p for p in pairs if p.method in args.methods.split(",")]

    base = load_base_model()
    _, library = open_library(LIBRARY, kinds={"private"})
    adapters = [InMemoryAdapter(a) for a in library.values()]
    lorafuse = LorafuseRunner(adapters)
    peft = PeftRunner(load_peft_model(base.model, library), list(library))
    runs: list[tuple[str, list[Result]]] = []
    for threads in dict.fromkeys((args.threads, 1)):  # the second run only if not 1 already
        torch.set_num_threads(threads)  # PEFT's threads; lorafuse's merge follows torch's
        suffix = "" if threads == args.threads else f"_threads{threads}"
        log(
            f"{len(adapters)} experts, {len(lorafuse.modules)} modules, {threads} threads, "
            f"{args.clock} clock"
        )
        with torch.no_grad():
            warm_up(lorafuse, peft)
            runs.append((suffix, [run_pair(pair, lorafuse, peft) for pair in pairs]))
    report(runs)
    if not args.no_memory:
        torch.set_num_threads(args.threads)
        report_merge_peak(args.threads)


if __name__ == "__main__":
    main()
