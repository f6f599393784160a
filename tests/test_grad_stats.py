"""_grad_stats against float64 and numpy references: norms at any size, exact histograms count for count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_monitor._grad.stats import STAT_COLUMNS, host_histogram, sample_stride, squared_norms, summarize


def _near_edges(lo: float, hi: float, bins: int, n: int, seed: int) -> np.ndarray:
    """``n`` float32 values within a few ulps of the float64 edges ``linspace(lo, hi)`` (and ``lo``, ``hi``)."""
    rng = np.random.default_rng(seed)
    edges = np.linspace(lo, hi, bins + 1).astype(np.float32)
    values = edges[rng.integers(0, bins + 1, n)]
    for _ in range(4):  # up to 4 ulps either way
        step = rng.integers(-1, 2, n)
        values = np.where(step > 0, np.nextafter(values, np.float32(np.inf)),
                          np.where(step < 0, np.nextafter(values, np.float32(-np.inf)), values))
    values = np.clip(values, np.float32(lo), np.float32(hi)).astype(np.float32)
    values[:2] = [np.float32(lo), np.float32(hi)]
    return values


def _reference(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    edges = np.linspace(lo, hi, bins + 1)  # as host_histogram builds them
    by_edges, _ = np.histogram(np.clip(values.astype(np.float64), lo, hi), bins=edges)
    by_range, _ = np.histogram(np.clip(values.astype(np.float64), lo, hi), bins=bins, range=(lo, hi))
    np.testing.assert_array_equal(by_edges, by_range)
    return by_edges


@pytest.mark.parametrize("bins", [64, 10, 7])
@pytest.mark.parametrize("hist_range", ["minmax", "symmetric", (-0.3, 0.1), (-0.25, 0.125)])
def test_exact_histogram_equals_numpy_count_for_count(bins, hist_range):
    lo, hi = (-0.31, 0.12) if isinstance(hist_range, str) else hist_range
    values = _near_edges(lo, hi, bins, 10**6, seed=bins)
    x = torch.from_numpy(values)
    row = summarize([x], squared_norms([x]), bins, None, hist_range)[0].numpy()
    counts, edges, stats = host_histogram(row, bins)
    lo64, hi64 = row[5], row[6]
    if hist_range == "minmax":
        assert (lo64, hi64) == (float(values.min()), float(values.max()))
    elif hist_range == "symmetric":
        assert hi64 == -lo64 == float(np.abs(values).max())
    else:
        assert (lo64, hi64) == hist_range  # the user's bounds, not rounded to float32
    np.testing.assert_array_equal(edges, np.linspace(lo64, hi64, bins + 1))
    np.testing.assert_array_equal(counts, _reference(values, lo64, hi64, bins))
    assert stats["num"] == values.size and counts.sum() == values.size


def test_exact_histograms_of_many_tensors_in_one_call():
    rng = np.random.default_rng(1)
    arrays = [_near_edges(-float(k + 1), float(2 * k + 1), 16, int(rng.integers(1, 5000)), seed=k) for k in range(50)]
    arrays.append(np.full(33, 2.5, dtype=np.float32))  # constant: the host recentres it
    tensors = [torch.from_numpy(a).reshape(-1, 1) if k % 2 else torch.from_numpy(a) for k, a in enumerate(arrays)]
    rows = summarize(tensors, squared_norms(tensors), 16, None, "minmax").numpy()
    for a, row in zip(arrays, rows, strict=True):
        counts, _, stats = host_histogram(row, 16)
        assert (stats["min"], stats["max"], stats["num"]) == (a.min(), a.max(), a.size)
        assert stats["sum"] == pytest.approx(a.astype(np.float64).sum(), rel=1e-6, abs=1e-6)
        if a.max() > a.min():
            np.testing.assert_array_equal(counts, _reference(a, row[5], row[6], 16))
        else:
            assert counts.sum() == a.size


def test_fixed_range_clamps_outside_values_into_the_edge_bins():
    x = torch.tensor([-5.0, -1.0, 0.1, 0.2, 0.999, 1.0, 9.0])
    row = summarize([x], squared_norms([x]), 2, None, (0.0, 1.0))[0].numpy()
    assert row[STAT_COLUMNS:].tolist() == [4, 3]


def test_sampled_counts_match_numpy_on_the_strided_sample():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, 333, generator=g), torch.randn(5000, generator=g), torch.randn(64, generator=g)]
    rows = summarize(tensors, squared_norms(tensors), 32, 10_000, "minmax").numpy()
    for t, row in zip(tensors, rows, strict=True):
        v = t.reshape(-1).numpy()
        stride = sample_stride(v.size, 10_000)
        sample = v[::stride]
        ref = _reference(sample, row[5], row[6], 32) * (v.size / sample.size)
        np.testing.assert_allclose(row[STAT_COLUMNS:], ref, rtol=1e-12)
        assert row[0] == v.min() and row[1] == v.max() and row[4] == v.size


def test_half_precision_histograms_and_float64_gradients():
    g = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(3000, generator=g) * 100).half(), torch.randn(2000, generator=g).bfloat16(),
               torch.randn(700, generator=g, dtype=torch.float64)]
    rows = summarize(tensors, squared_norms(tensors), 20, None, "symmetric").numpy()
    for t, row in zip(tensors, rows, strict=True):
        v = t.double().numpy()
        np.testing.assert_array_equal(row[STAT_COLUMNS:], _reference(v, row[5], row[6], 20))
        assert row[3] == pytest.approx(np.square(v).sum(), rel=1e-6)


@pytest.mark.parametrize("dist", ["randn", "rand", "shifted"])
def test_norm_of_a_2_pow_24_element_gradient_within_1e6_of_float64(dist):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2**24, generator=g) if dist != "rand" else torch.rand(2**24, generator=g)
    if dist == "shifted":
        x = x.abs_().add_(3.0)
    small = torch.randn(1000, generator=g)
    tensors = [small, x, x[:777].reshape(7, 111)]
    sq = squared_norms(tensors)
    from_copy = summarize(tensors, None, 8, 1000, "minmax", cache=False)[:, 3]  # summarize's own, from its copy
    for got, own, t in zip(sq.tolist(), from_copy.tolist(), tensors, strict=True):
        ref = float(t.double().square().sum())
        assert abs(got - ref) <= 1e-6 * ref and abs(own - ref) <= 1e-6 * ref


def test_half_precision_norms_never_overflow():
    grads = [torch.full((100,), 3e4, dtype=torch.float16), torch.full((40000,), 6e4, dtype=torch.bfloat16)]
    sq = squared_norms(grads)
    assert sq.dtype == torch.float64 and torch.isfinite(sq).all()
    assert float(sq[0].sqrt()) == pytest.approx(3e5, rel=1e-6)
    assert float(sq[1]) == pytest.approx(40000 * float(grads[1][0]) ** 2, rel=1e-6)


def test_a_finite_gradient_beyond_float32_squares_is_not_read_as_inf():
    """CPU norms square in float32 (overflow past ~1.8e19 an element): such a tensor, small or large, is measured
    again in float64 (a finite norm, no false NaN/Inf), the others keep their float32 values, and a real NaN stays."""
    nan = torch.tensor([float("nan"), 1.0])
    tensors = [torch.full((100,), 3e19), torch.ones(5), torch.full((200_000,), -2e19), nan]
    sq = squared_norms(tensors).tolist()
    for got, t in list(zip(sq, tensors, strict=True))[:3]:
        assert math.isfinite(got) and got == pytest.approx(float(t.double().square().sum()), rel=1e-6)
    assert sq[1] == 5.0 and math.isnan(sq[3])


def test_nonfinite_norms_stay_nonfinite():
    x = torch.randn(50_000)
    x[40_000] = float("nan")
    assert torch.isnan(squared_norms([torch.ones(3), x])[1])


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.compute = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func._schema.name in ("aten::detach", "aten::expand"):
            self.views += 1
        else:
            self.compute += 1
        return func(*args, **(kwargs or {}))


def _ops_per_event(tensors: list[torch.Tensor], max_elements) -> tuple[int, int]:
    sq = squared_norms(tensors)
    summarize(tensors, sq, 64, max_elements, "minmax")  # the first call plans the layout
    with _CountOps() as ops:
        summarize(tensors, sq, 64, max_elements, "minmax")
    return ops.compute, ops.views


@pytest.mark.parametrize("max_elements", [None, 1000])
def test_device_ops_per_event_do_not_grow_with_the_number_of_tensors(max_elements):
    few = [torch.randn(3000), torch.randn(20), torch.randn(50, 60)]
    many = [torch.randn(3000) for _ in range(100)] + [torch.randn(20) for _ in range(100)]
    assert _ops_per_event(few, max_elements)[0] == _ops_per_event(many, max_elements)[0]


@pytest.mark.parametrize("hist_range", ["minmax", "symmetric", (-1.0, 1.0)])
def test_nan_and_inf_never_reach_another_tensors_histogram(hist_range):
    """A +Inf in the last bin of a fixed range used to step into the next tensor's first bin (one count too many)."""
    g = torch.Generator().manual_seed(5)
    bad = torch.randn(1000, generator=g)
    bad[[5, 7, 9]] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    clean = torch.randn(1000, generator=g)
    rows = summarize([bad, clean, bad, clean], None, 16, None, hist_range, cache=False).numpy()
    for row in rows[[1, 3]]:
        np.testing.assert_array_equal(row[STAT_COLUMNS:], _reference(clean.double().numpy(), row[5], row[6], 16))
    assert not np.isfinite(rows[[0, 2], 3]).any()  # the caller sees NaN/Inf there and redoes those rows


@pytest.mark.parametrize("max_elements", [None, 1000])
def test_a_measured_step_has_a_fixed_op_count_on_the_cuda_norm_path(monkeypatch, max_elements):
    """The device part of a logging event (norms, histograms, the packed transfer) runs the same number of ops for
    3 tensors or 200, with every tensor histogrammed or only some (the cap), when the norms take the fused
    ``_foreach_norm`` pass CUDA takes (forced here on the CPU)."""
    from lightning_monitor._grad import norms as _grad_norms
    from lightning_monitor._grad.event import MeasureSpec, measure

    monkeypatch.setattr(_grad_norms, "FUSED", True)
    spec = MeasureSpec(bins=64, max_elements=max_elements, hist_range="minmax", grad_histograms=True,
                       param_histograms=False, weights=False)

    def ops(tensors: list[torch.Tensor], hist: np.ndarray) -> int:
        def event() -> tuple:
            return measure(spec, 0, np.arange(len(tensors)), tensors, weights=[], hist=hist, pending=[])

        measured, _ = event()  # plans the layout
        with _CountOps() as counted:
            event()
        np.testing.assert_allclose(measured.sq, [float(t.double().square().sum()) for t in tensors], rtol=1e-6)
        return counted.compute

    few = [torch.randn(3000), torch.randn(20), torch.randn(50, 60)]
    many = [torch.randn(3000) for _ in range(100)] + [torch.randn(20) for _ in range(100)]
    assert ops(few, np.arange(3)) == ops(many, np.arange(200))
    assert ops(few, np.array([0, 2])) == ops(many, np.arange(0, 200, 4))


@pytest.mark.parametrize("in_place", [3000, 100])
def test_sampled_large_tensors_reduced_where_they_lie_equal_the_copied_ones(monkeypatch, in_place):
    """Sampled tensors of at least ``_IN_PLACE`` elements are not copied: the same rows as the copy path (counts,
    min, max exactly; sum and norms within float rounding), also when no tensor is copied at all (100)."""
    from lightning_monitor._grad import stats as _grad_stats

    g = torch.Generator().manual_seed(7)
    tensors = [torch.randn(5000, generator=g) * 3 + 1, torch.randn(200, generator=g), torch.randn(97, 41, generator=g),
               torch.rand(12_345, generator=g).half()]
    for hist_range in ["minmax", "symmetric", (-2.0, 2.0)]:
        copied = summarize(tensors, None, 16, 1000, hist_range, cache=False).numpy()
        monkeypatch.setattr(_grad_stats, "_IN_PLACE", in_place)
        split = summarize(tensors, None, 16, 1000, hist_range, cache=False).numpy()
        monkeypatch.setattr(_grad_stats, "_IN_PLACE", 1 << 22)
        np.testing.assert_array_equal(split[:, [0, 1, 4, 5, 6]], copied[:, [0, 1, 4, 5, 6]])
        np.testing.assert_array_equal(split[:, STAT_COLUMNS:], copied[:, STAT_COLUMNS:])
        np.testing.assert_allclose(split[:, 2:4], copied[:, 2:4], rtol=1e-6, atol=1e-6)
        for t, row in zip(tensors, split, strict=True):
            v = t.double().reshape(-1).numpy()
            assert row[3] == pytest.approx(np.square(v).sum(), rel=1e-6)


def test_a_tensor_over_the_in_place_size_gets_exact_stats_and_its_strided_sample():
    from lightning_monitor._grad.stats import _IN_PLACE

    g = torch.Generator().manual_seed(8)
    big, small = torch.randn(_IN_PLACE + 333, generator=g), torch.randn(50_000, generator=g)
    rows = summarize([small, big], None, 32, 16384, "minmax").numpy()
    for t, row in zip([small, big], rows, strict=True):
        v = t.numpy()
        sample = v[:: sample_stride(v.size, 16384)]
        np.testing.assert_allclose(row[STAT_COLUMNS:], _reference(sample, row[5], row[6], 32) * (v.size / sample.size),
                                   rtol=1e-12)
        assert (row[0], row[1], row[4]) == (v.min(), v.max(), v.size)
        assert row[2] == pytest.approx(v.astype(np.float64).sum(), rel=1e-5, abs=1e-2)
        assert row[3] == pytest.approx(np.square(v.astype(np.float64)).sum(), rel=1e-6)


def test_group_plan_sums_every_parameter_as_group_norms_does():
    """The plain-Python sum of a step where every parameter has a gradient equals numpy's, group for group: a
    parameter in no group (-1) and a group left with no parameter (over the key cap) give no key; NaN stays NaN."""
    from lightning_monitor._grad.groups import GroupPlan, group_norms

    rng = np.random.default_rng(0)
    names = ["enc", "capped", "dec", "head"]
    gid = np.array([0, 2, -1, 0, 3, 2, 2, -1])
    plan = GroupPlan(names, gid)
    everyone = np.ones(gid.size, dtype=bool)
    for sq in (rng.random(gid.size) * 10.0 ** rng.integers(-8, 8, gid.size), np.array([1.0, np.nan, 2, 3, 4, 5, 6, 7])):
        expected = group_norms("grad/norm", names, gid, everyone, sq)
        got = plan.norms("grad/norm", None, sq.tolist())
        assert list(got) == list(expected) == ["grad/norm/enc", "grad/norm/dec", "grad/norm/head"]
        np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-15)
        as_array = plan.norms("grad/norm", None, sq)  # the host array as it is
        assert list(as_array) == list(got)
        np.testing.assert_array_equal(list(as_array.values()), list(got.values()))
    some = everyone.copy()
    some[[0, 3]] = False  # enc has no gradient at this step: no key
    sq = rng.random(gid.size)
    assert plan.norms("param/norm", some, sq) == group_norms("param/norm", names, gid, some, sq)
    assert list(plan.norms("param/norm", some, sq)) == ["param/norm/dec", "param/norm/head"]
