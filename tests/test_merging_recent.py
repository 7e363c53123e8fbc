"""The merge methods since 2024 against their papers' formulas, re-derived here in dense
space on small hand-made matrices (full SVDs, loops, numpy/scipy), not through the factor
shortcuts the implementations take."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lorafuse.errors import LorafuseError
from lorafuse.library import LoraFactors
from lorafuse.merging import get_method
from lorafuse.merging.dense_methods import magnitude_prune
from lorafuse.merging.interference_methods import pcb, wudi
from lorafuse.merging.pruning_methods import (
    breadcrumbs,
    breadcrumbs_prune,
    della,
    della_keep_probability,
    della_prune,
)
from lorafuse.merging.subspace_methods import core_space, knots
from lorafuse.merging.svd_methods import iso_c, iso_cts, tsv_c, tsv_m

D = torch.float64


def lora(seed: int, r: int, d_out: int = 7, d_in: int = 6, scaling: float = 0.5) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        A=torch.randn(r, d_in, generator=g, dtype=D),
        B=torch.randn(d_out, r, generator=g, dtype=D),
        scaling=scaling,
    )


PARTS = [lora(1, 2), lora(2, 1), lora(3, 2)]  # mixed ranks, sum 5 < min(d) = 6
W = [1.0, -0.5, 2.0]


def dense(parts: list[LoraFactors], weights: list[float]) -> list[torch.Tensor]:
    return [w * p.scaling * p.B @ p.A for p, w in zip(parts, weights, strict=True)]


def top_svd(m: torch.Tensor, k: int | None = None, tol: float = 1e-9):
    """Full dense SVD, nonzero triplets only, top k of them."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    n = int((s > tol * s[0]).sum())
    n = n if k is None else min(n, k)
    return u[:, :n], s[:n], vh[:n]


def ties_reference(ts: list[torch.Tensor], w: list[float], density: float) -> torch.Tensor:
    """TIES by loops: top round(density n) magnitudes per task, sign of the sum of the trimmed
    values (0 -> +), mean over the agreeing nonzero entries of w_k t_k."""
    shape = ts[0].shape
    flat = [t.reshape(-1).tolist() for t in ts]
    n = len(flat[0])
    k = round(density * n)
    trimmed = []
    for row in flat:
        order = sorted(range(n), key=lambda i: -abs(row[i]))[:k]
        trimmed.append([row[i] if i in order else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        elected = 1.0 if sum(t[i] for t in trimmed) >= 0 else -1.0
        agree = [(wk, t[i]) for wk, t in zip(w, trimmed, strict=True) if t[i] * elected > 0]
        out.append(sum(wk * v for wk, v in agree) / max(len(agree), 1))
    return torch.tensor(out, dtype=ts[0].dtype).reshape(shape)


# ------------------------------------------------------------------------ DELLA
def test_della_keep_probability_known_answer() -> None:
    row = torch.tensor([[0.1, -0.4, 0.3, 0.2]], dtype=D)
    p = della_keep_probability(row, density=0.5, epsilon=0.1)
    # magnitude ranks 0, 3, 2, 1 -> 0.4 + 0.2 * rank / 3
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.6, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3]], dtype=D))
    with pytest.raises(ValueError, match="density - epsilon"):
        della_keep_probability(row, density=0.1, epsilon=0.1)


def test_della_prune_is_unbiased_and_keeps_big_entries_more() -> None:
    delta = torch.linspace(-1.0, 1.0, 64, dtype=D).reshape(1, 64) + 0.01
    draws = torch.stack(
        [della_prune(delta, 0.5, 0.3, torch.Generator().manual_seed(s)) for s in range(4000)]
    )
    kept = (draws != 0).to(D).mean(0)
    p = della_keep_probability(delta, 0.5, 0.3)
    assert (kept - p).abs().max() < 0.04  # each entry kept with its own probability
    torch.testing.assert_close(draws.mean(0), delta, atol=0.06, rtol=0)  # rescaled by 1/p
    big, small = delta.abs().argmax(), delta.abs().argmin()
    assert kept[0, big] > 0.75 and kept[0, small] < 0.25


def test_della_is_ties_on_the_magpruned_experts() -> None:
    ts = dense(PARTS, [1.0] * 3)
    w = [1.0, 0.5, 2.0]
    out = della(torch.stack(ts), w, density=0.6, epsilon=0.2, seed=3)
    pruned = della_prune(torch.stack(ts), 0.6, 0.2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ties_reference(list(pruned), w, 1.0))
    lin = della(torch.stack(ts), w, density=0.6, epsilon=0.2, seed=3, sign_consensus=False)
    torch.testing.assert_close(lin, sum(wk * t for wk, t in zip(w, pruned, strict=True)))


def test_della_epsilon_is_validated_in_one_line() -> None:
    with pytest.raises(LorafuseError, match="invalid parameter 'epsilon' for method 'della'"):
        get_method("della").parse_params({"density": 0.9, "epsilon": 0.2})


# ------------------------------------------------------------------ Breadcrumbs
def test_breadcrumbs_prune_drops_both_tails() -> None:
    x = torch.tensor([[3.0, -10.0, 1.0, 7.0, -5.0], [2.0, 9.0, -4.0, 6.0, 8.0]], dtype=D)
    # density 0.5 -> 5 kept, gamma 0.1 -> the 1 largest (|-10|) dropped: 9 8 7 6 -5 stay
    want = torch.tensor([[0.0, 0.0, 0.0, 7.0, -5.0], [0.0, 9.0, 0.0, 6.0, 8.0]], dtype=D)
    torch.testing.assert_close(breadcrumbs_prune(x, 0.5, 0.1), want)
    torch.testing.assert_close(breadcrumbs_prune(x, 0.5, 0.0), magnitude_prune(x, 0.5))
    # gamma too large to fit: fewer outliers dropped so that density is kept (mergekit)
    assert int((breadcrumbs_prune(x, 0.9, 0.5) != 0).sum()) == 9


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.05), (0.5, 0.0), (0.9, 0.2), (1.0, 0.0)])
def test_breadcrumbs_prune_equals_stable_sort(tied: bool, density: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 13, generator=g, dtype=D)
    if tied:  # few distinct magnitudes: every threshold is tied, broken by position
        x = torch.randint(-3, 4, (9, 13), generator=g).to(D)
    n = x.numel()
    keep, top = round(density * n), min(round(gamma * n), n - round(density * n))
    flat = x.reshape(-1).tolist()
    ranked = sorted(range(n), key=lambda i: (-abs(flat[i]), i))[top : top + keep]
    want = torch.tensor([v if i in ranked else 0.0 for i, v in enumerate(flat)], dtype=D)
    torch.testing.assert_close(breadcrumbs_prune(x, density, gamma), want.reshape(9, 13))


def test_breadcrumbs_merge_is_scaled_sum_of_masked() -> None:
    ts = dense(PARTS, [1.0] * 3)
    out = breadcrumbs(torch.stack(ts), W, density=0.4, gamma=0.05, scale=0.7)
    want = 0.7 * sum(w * breadcrumbs_prune(t, 0.4, 0.05) for w, t in zip(W, ts, strict=True))
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------------ PCB
def pcb_numpy(tvs: np.ndarray, ratio: float) -> np.ndarray:
    """The PCB paper's reference code (PCB_merge), transcribed to numpy."""
    n, d = tvs.shape

    def norm(x):
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return (x - lo) / (hi - lo)

    def clamp(x, lo_r, hi_r):
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, int(d * lo_r)][:, None], s[:, int(d * (1 - hi_r) - 1)][:, None])

    a = clamp(np.abs(tvs), 1e-4, 1e-4)
    self_act = np.exp(n * norm(a) ** 2)
    cross_act = np.tanh(tvs * tvs.sum(0))
    scale = norm(clamp(self_act * cross_act, 1 - ratio, 0))
    return (np.sign(tvs) * a * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


def test_pcb_matches_reference_code() -> None:
    ts = torch.stack(dense(PARTS, [1.0] * 3))
    out = pcb(ts, [1.0] * 3, density=0.3, scale=1.5)
    want = 1.5 * pcb_numpy(ts.reshape(3, -1).numpy(), 0.3)
    np.testing.assert_allclose(out.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-12)
    kept = (out != 0).sum().item()  # entries no task keeps merge to 0
    assert 0 < kept < out.numel()


# ------------------------------------------------------------------------ TSV
def test_tsv_m_and_tsv_c_match_dense_svds() -> None:
    ts = dense(PARTS, W)
    k = int(6 / 3)  # floor(min(d) / T) per task, at most the task's rank
    us, ss, vs = zip(*(top_svd(t, k) for t in ts), strict=True)
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0).T
    u_perp, _ = scipy.linalg.polar(u.numpy())  # u = u_perp @ p, orthonormal columns
    v_perp, _ = scipy.linalg.polar(v.numpy())
    want_m = 0.8 * torch.from_numpy(u_perp) @ torch.diag(s) @ torch.from_numpy(v_perp).T
    torch.testing.assert_close(tsv_m(PARTS, W, scale=0.8).delta(), want_m)
    want_c = 0.8 * sum(a @ torch.diag(b) @ c for a, b, c in zip(us, ss, vs, strict=True))
    torch.testing.assert_close(tsv_c(PARTS, W, scale=0.8).delta(), want_c)
    one = tsv_c(PARTS, W, fraction=1 / 6)  # k = 1: rank-1 truncations
    torch.testing.assert_close(
        one.delta(),
        sum(
            top_svd(t, 1)[1][0] * torch.outer(top_svd(t, 1)[0][:, 0], top_svd(t, 1)[2][0])
            for t in ts
        ),
    )


def test_tsv_m_of_orthogonal_tasks_is_task_arithmetic() -> None:
    a, b = torch.zeros(2, 6, dtype=D), torch.zeros(2, 6, dtype=D)
    a[0, 0], a[1, 1], b[0, 2], b[1, 3] = 1.0, 2.0, 3.0, -1.0
    ba, bb = torch.zeros(7, 2, dtype=D), torch.zeros(7, 2, dtype=D)
    ba[0, 0], ba[1, 1], bb[2, 0], bb[3, 1] = 2.0, 1.0, 1.0, 4.0
    parts = [LoraFactors(A=a, B=ba, scaling=1.0), LoraFactors(A=b, B=bb, scaling=1.0)]
    torch.testing.assert_close(tsv_m(parts, [1.0, 1.0]).delta(), ba @ a + bb @ b)


# ------------------------------------------------------------------------ Iso
def test_iso_c_known_answer_and_dense() -> None:
    a = LoraFactors(
        A=torch.eye(2, 6, dtype=D),
        B=torch.diag(torch.tensor([3.0, 1.0], dtype=D)).repeat(4, 1)[:7],
        scaling=1.0,
    )
    delta = a.delta()
    u, s, vh = top_svd(delta)
    torch.testing.assert_close(iso_c([a], [1.0]).delta(), s.mean() * u @ vh)
    total = sum(dense(PARTS, W))
    u, s, vh = top_svd(total)
    assert s.numel() == 5  # rank of the sum: sum of ranks
    torch.testing.assert_close(iso_c(PARTS, W, scale=0.5).delta(), 0.5 * s.mean() * u @ vh)
    # spectrum flat: every nonzero singular value of the merge is the same
    flat = torch.linalg.svdvals(iso_c(PARTS, W).delta())[:5]
    torch.testing.assert_close(flat, torch.full_like(flat, float(s.mean())))


def test_iso_cts_matches_dense_steps() -> None:
    ts = dense(PARTS, W)
    total = sum(ts)
    n_all, t = 5, 3  # rank of the sum; tasks
    k_c = int(n_all * 0.4)  # 2
    per = round((n_all - k_c) / t)  # 1
    k_c = n_all - per * t  # 2
    uc, sc, vc = top_svd(total, k_c)
    pieces = [top_svd(x - uc @ uc.T @ x, per) for x in ts] + [(uc, sc, vc)]
    u = torch.cat([p[0] for p in pieces], 1)
    s = torch.cat([p[1] for p in pieces])
    v = torch.cat([p[2] for p in pieces], 0).T
    u_perp, _ = scipy.linalg.polar(u.numpy())
    v_perp, _ = scipy.linalg.polar(v.numpy())
    want = s.mean() * torch.from_numpy(u_perp) @ torch.from_numpy(v_perp).T
    torch.testing.assert_close(iso_cts(PARTS, W, common_fraction=0.4).delta(), want)


# ------------------------------------------------------------------------ KnOTS
def test_knots_is_ties_on_joint_svd_coordinates() -> None:
    ts = dense(PARTS, [1.0] * 3)
    u, s, vh = top_svd(torch.cat(ts, dim=1))
    coords = [s[:, None] * blk for blk in torch.split(vh, 6, dim=1)]
    for i, t in enumerate(ts):  # each task is exactly U (S V_i^T)
        torch.testing.assert_close(u @ coords[i], t)
    w = [1.0, 0.5, 2.0]
    want = 0.6 * u @ ties_reference(coords, w, 0.4)
    torch.testing.assert_close(knots(PARTS, w, density=0.4, scale=0.6).delta(), want)


# ------------------------------------------------------------------------ Core Space
def test_core_space_is_exact_for_mixed_ranks_and_commutes_with_svd_methods() -> None:
    lin = core_space(PARTS, W, inner="task_arithmetic", scale=0.3)
    torch.testing.assert_close(lin.delta(), 0.3 * sum(dense(PARTS, W)))
    # TSV-M on the cores keeps floor(min(core dims) / T) = floor(5 / 3) = 1 vector per task
    core_tsv = core_space(PARTS, W, inner="tsv_m").delta()
    torch.testing.assert_close(core_tsv, tsv_m(PARTS, W, fraction=1 / 6).delta())
    torch.testing.assert_close(core_space(PARTS, W, inner="iso_c").delta(), iso_c(PARTS, W).delta())


def test_core_space_ties_on_cores() -> None:
    u_b = top_svd(torch.cat([p.B for p in PARTS], 1))[0]
    v_a = top_svd(torch.cat([p.A for p in PARTS], 0))[2].T
    cores = [u_b.T @ t @ v_a for t in dense(PARTS, [1.0] * 3)]
    w = [1.0, 0.5, 2.0]
    want = u_b @ ties_reference(cores, w, 0.5) @ v_a.T
    torch.testing.assert_close(core_space(PARTS, w, inner="ties", density=0.5).delta(), want)
    with pytest.raises(ValueError, match="needs a density"):
        core_space(PARTS, w, inner="ties")


# ------------------------------------------------------------------------ WUDI
def wudi_loss(m: torch.Tensor, ts: list[torch.Tensor]) -> torch.Tensor:
    return sum(((m - t) @ t.T).square().sum() / t.square().sum() for t in ts)


def test_wudi_is_the_minimiser_of_its_loss() -> None:
    ts = dense(PARTS, W)
    out = wudi(PARTS, W).delta()
    # dense normal equations: m sum_i G_i = sum_i t_i G_i, G_i = t_i^T t_i / ||t_i||^2
    g = [t.T @ t / t.square().sum() for t in ts]
    want = sum(t @ gi for t, gi in zip(ts, g, strict=True)) @ torch.linalg.pinv(sum(g))
    torch.testing.assert_close(out, want)
    m = out.clone().requires_grad_(True)
    wudi_loss(m, ts).backward()
    assert m.grad.abs().max() < 1e-10  # stationary point of the paper's loss
    start = sum(ts)  # the paper's initialisation is worse
    assert wudi_loss(out, ts) < wudi_loss(start, ts)
    # gradient descent from the sum (the paper's start; plain GD, not Adam) converges to it
    x, g_sum, c_sum = start.clone(), sum(g), sum(t @ gi for t, gi in zip(ts, g, strict=True))
    for _ in range(10000):
        x -= 0.5 * 2 * (x @ g_sum - c_sum)  # the loss's gradient
    torch.testing.assert_close(x, out, atol=1e-8, rtol=0)


def test_methods_keep_dtype_and_zero_experts() -> None:
    f32 = [LoraFactors(A=p.A.float(), B=p.B.float(), scaling=p.scaling) for p in PARTS]
    zero = LoraFactors(A=torch.zeros(2, 6), B=torch.zeros(7, 2), scaling=1.0)
    for fn, kw in [(tsv_m, {}), (iso_c, {}), (iso_cts, {}), (knots, {"density": 0.5}), (wudi, {})]:
        assert fn(f32, [1.0] * 3, **kw).A.dtype == torch.float32
        z = fn([zero, zero], [1.0, 1.0], **kw)
        assert z.rank >= 1 and torch.count_nonzero(z.delta()) == 0


def test_compare_rows_are_valid_settings() -> None:
    from lorafuse.fusion.methods import RECENT_MERGES, STATIC_MERGES
    from lorafuse.merging import merge_module

    assert not set(RECENT_MERGES) & set(STATIC_MERGES)
    f32 = [LoraFactors(A=p.A.float(), B=p.B.float(), scaling=p.scaling) for p in PARTS]
    for method, params in RECENT_MERGES.values():
        spec = get_method(method)
        out = merge_module(spec, f32, spec.default_weight_list(3), spec.parse_params(params))
        assert out.delta().shape == (7, 6) and torch.isfinite(out.delta()).all()


def test_lorafuse_methods_lists_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafuse.cli import main

    monkeypatch.setattr("sys.argv", ["lorafuse", "methods"])
    try:
        main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    lines = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.splitlines()[1:]
        if line.startswith("  ")
    }
    dense = ["della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "pcb"]
    svd = ["tsv_m", "tsv_c", "iso_c", "iso_cts", "knots"]
    new = {**dict.fromkeys(dense, "dense"), **dict.fromkeys(svd, "svd")}
    new |= {"core_space": "factors", "wudi": "factors"}
    assert {name: lines.get(name) for name in new} == new
