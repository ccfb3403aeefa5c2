"""The speed kernels of issue 13 against their definitions: the counter-addressable random streams,
the threshold form of the TIES trim, the blocked fuse, DELLA's composite-key order, the one-pass
finiteness check and the threaded row sort.

Random tests state their bounds in standard deviations of the binomial / uniform they sample.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_merge.methods import fuse, rng
from lightning_merge.methods.dare import dare_drop, dare_mask
from lightning_merge.methods.della import _descending_order, magprune, magprune_mask
from lightning_merge.methods.kernels import abs_bits, all_finite, sort_rows, topk_mask, topk_threshold, topk_thresholds


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


# ---- random streams -------------------------------------------------------------------------


def test_stream_words_are_pinned():
    """The documented stream: changing the key derivation or the word order changes users' masks
    (the README's "masks of a seed" promise), so the first words of one stream are pinned."""
    key = rng.stream_key(0, "model.layers.0.mlp.up_proj.weight", 1)
    raw = np.random.PCG64DXSM(np.random.SeedSequence(key)).random_raw(2)
    expected = [int(raw[0]) & 0xFFFFFFFF, int(raw[0]) >> 32, int(raw[1]) & 0xFFFFFFFF]
    assert rng.words(key, 0, 3).tolist() == expected
    assert rng.stream_key(0, "a", 0) != rng.stream_key(0, "a", 1) != rng.stream_key(1, "a", 0)


@pytest.mark.parametrize("start", [0, 1, 2, 7, 1000, 12345])
def test_any_element_range_without_the_words_before_it(start):
    key = rng.stream_key(3, "w", 2)
    whole = rng.words(key, 0, start + 101)
    assert np.array_equal(rng.words(key, start, 101), whole[start:])


def test_a_shard_draws_what_the_whole_tensor_draws():
    """A row shard (start = first row · row length) gets exactly its rows of the whole mask."""
    whole = rng.stream_for(5, "t", 1).keep(0.3, (64, 33))
    rows = rng.stream_for(5, "t", 1, start=17 * 33).keep(0.3, (20, 33))
    assert torch.equal(rows, whole[17:37])
    u_whole = rng.stream_for(5, "t", 1).uniform((64, 33))
    assert torch.equal(rng.stream_for(5, "t", 1, start=5 * 33).uniform((3, 33)), u_whole[5:8])


def test_masks_do_not_depend_on_the_thread_count(two_threads):
    n = 2 * rng.CHUNK + 12345  # three ranges on two threads, one on one thread
    q = torch.rand(n, generator=torch.Generator().manual_seed(0))
    stream = rng.stream_for(0, "big", 0)
    torch.set_num_threads(2)
    many = (stream.keep(0.3, (n,)), stream.keep(q, (n,)), stream.uniform((n,)))
    torch.set_num_threads(1)
    one = (stream.keep(0.3, (n,)), stream.keep(q, (n,)), stream.uniform((n,)))
    for a, b in zip(many, one):
        assert torch.equal(a, b)


def test_scalar_and_tensor_keep_probabilities_make_the_same_decision():
    """w < ⌈q·2²⁴⌉·2⁸ (the scalar fast path) is exactly u < q (the per-element path)."""
    stream = rng.stream_for(1, "x", 0)
    for q in (0.0, 1e-7, 0.3, 0.5, 0.7, 1 - 1e-7, 1.0):
        assert torch.equal(stream.keep(q, (50_000,)), stream.keep(torch.full((50_000,), q), (50_000,))), q
    assert stream.keep(1.0, (1000,)).all() and not stream.keep(0.0, (1000,)).any()
    u = stream.uniform((50_000,))
    assert torch.equal(stream.keep(0.3, (50_000,)), u < 0.3)


def test_stream_statistics():
    """Keep rate, uniform mean and independence across experts, each within 6 standard deviations."""
    n = 1_000_000
    q = 0.3
    keep0 = rng.stream_for(0, "t", 0).keep(q, (n,)).double()
    keep1 = rng.stream_for(0, "t", 1).keep(q, (n,)).double()
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(keep0.mean().item() - q) < 6 * sd
    assert abs(keep1.mean().item() - q) < 6 * sd
    # P(both kept) = q² for independent streams; its sampling sd is sqrt(q²(1−q²)/n)
    assert abs((keep0 * keep1).mean().item() - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / n)
    u = rng.stream_for(0, "t", 2).uniform((n,)).double()
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    # neighbouring words (the two halves of one raw output) are uncorrelated
    corr = torch.corrcoef(torch.stack([u[0::2], u[1::2]]))[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(n / 2)


# ---- TIES trim as a threshold -----------------------------------------------------------------


@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_topk_threshold_keeps_what_topk_mask_keeps(density):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-6, 7, (40, 37), generator=g).float() * 0.25  # many ties, zeros, both signs
    kept = topk_mask(x, density) & (x != 0)
    y = x.clone()
    thr = topk_threshold(y, density)
    if density >= 1.0:
        assert thr is None and torch.equal(y, x)
        return
    assert torch.equal((y.abs() >= thr) & (y != 0), kept)
    assert torch.equal(y[kept], x[kept])  # kept entries untouched; only excess ties were zeroed


def test_topk_thresholds_in_parallel_equal_one_by_one(two_threads):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(2)
    xs = [(torch.randint(-50, 51, (rng.CHUNK + 3,), generator=g).float()) for _ in range(3)]
    ys = [x.clone() for x in xs]
    together = topk_thresholds(ys, [0.1, 0.3, 0.5])
    alone = []
    for x, d in zip(xs, [0.1, 0.3, 0.5]):
        alone.append(topk_threshold(x, d))
    assert together == alone
    for x, y in zip(xs, ys):
        assert torch.equal(x, y)


# ---- blocked fuse -------------------------------------------------------------------------------


def _deltas(shape=(3, 1000), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[:, ::7] = 0.0
    x[0, ::5] = -x[1, ::5]  # exact cancellations: S = 0 entries
    return x


@pytest.mark.parametrize("kwargs", [
    {}, {"election": "unweighted", "divisor": "count"}, {"normalize": False}, {"zero_sign": "majority"},
])
def test_blocked_fuse_equals_one_block(monkeypatch, kwargs):
    x = _deltas()
    w = [0.5, 1.0, -0.25]
    whole = fuse.elect_and_fuse(x, w, **kwargs)
    monkeypatch.setattr(fuse, "FUSE_BLOCK", 7)
    assert torch.equal(fuse.elect_and_fuse(x, w, **kwargs), whole)
    assert torch.equal(fuse.elect_and_fuse(x.clone(), w, consume=True, **kwargs), whole)


def test_fuse_elects_positive_on_exact_cancellation():
    x = torch.tensor([[1.0, 2.0], [-1.0, -3.0]])
    # S = 0 at entry 0: γ = +1, only the positive expert is elected
    assert torch.equal(fuse.elect_and_fuse(x, [1.0, 1.0]), torch.tensor([1.0, -3.0]))


def test_prepare_inside_the_fuse_equals_sparsify_then_fuse(monkeypatch):
    """DARE's mask now, rescale per block inside the fused loop == dare_drop, then the fuse."""
    monkeypatch.setattr(fuse, "FUSE_BLOCK", 64)
    x = _deltas((3, 999), seed=4)
    for rescale in ("inverse_prob", "l1", "none"):
        dropped = [dare_drop(x[t].clone(), 0.3, rng.stream_for(0, "t", t), rescale=rescale) for t in range(3)]
        expected = fuse.elect_and_fuse(torch.stack(dropped), [1.0, 1.0, 1.0])
        work = [x[t].clone() for t in range(3)]
        finish = [dare_mask(work[t], 0.3, rng.stream_for(0, "t", t), rescale) for t in range(3)]
        got = fuse.elect_and_fuse(work, [1.0, 1.0, 1.0], consume=True,
                                  prepare=lambda t, block, start, fin=finish: fin[t](block, start))
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), rescale


def test_della_mask_then_finish_equals_magprune():
    x = _deltas((3, 40, 25), seed=5)[1]
    expected = magprune(x.clone(), 0.4, 0.1, rng.stream_for(0, "t", 0))
    work = x.clone()
    finish = magprune_mask(work, 0.4, 0.1, rng.stream_for(0, "t", 0))
    assert torch.allclose(finish(work.view(-1), 0).view_as(x), expected, rtol=0, atol=1e-6)


# ---- DELLA's order, finiteness, row sort -----------------------------------------------------------


def test_descending_order_equals_torch_stable_sort():
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(-4, 5, (9, 301), generator=g).float()
    rows[0] = 0.0
    rows[1, 10] = -0.0
    reference = torch.sort(abs_bits(rows), dim=1, descending=True, stable=True).indices
    assert torch.equal(_descending_order(rows), reference)


def test_all_finite():
    assert all_finite(torch.tensor([1.0, -2.0]))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows, yet every entry is finite
    assert all_finite(torch.full((4,), 6e4, dtype=torch.float16))
    assert all_finite(torch.tensor([1, 2]))
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert not all_finite(torch.tensor([1.0, bad, 2.0]))
        assert not all_finite(torch.tensor([1.0, bad], dtype=torch.bfloat16))
    assert not all_finite(torch.tensor([3e38, 3e38, float("-inf")]))


def test_sort_rows_threaded_equals_numpy(two_threads):
    torch.set_num_threads(2)
    a = np.random.default_rng(0).integers(-1000, 1000, size=(8, rng.CHUNK // 4), dtype=np.int64)
    expected = np.sort(a, axis=1)
    sort_rows(a)
    assert np.array_equal(a, expected)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties"])
def test_engine_merges_inputs_that_require_grad(method):
    """The sharded route hands the engine full tensors of live parameters (requires_grad): the
    engine merges without autograd (the fused loop writes into buffers with ``out=``, which
    autograd refuses)."""
    from lightning_merge.engine import build_plan, load_inputs, merge_task
    from lightning_merge.methods import get_method
    from lightning_merge.sources import StateDictSource

    torch.manual_seed(0)
    srcs = [StateDictSource(dict(torch.nn.Linear(32, 32).state_dict()), f"m{j}") for j in range(3)]
    plan = build_plan(srcs[0], srcs[1:], get_method(method))
    for task in plan.tasks:
        want = merge_task(plan, task, load_inputs(plan, task))
        inputs = load_inputs(plan, task)
        for t in [inputs.base, *inputs.tensors]:
            t.requires_grad_()
        got = merge_task(plan, task, inputs)
        assert not got.requires_grad and torch.equal(got, want), task.name


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (none here: the CPU CI runs every other kernel test)")


@needs_cuda
def test_cuda_merges_stay_on_the_device_and_match_cpu():
    """--device cuda: selection, masks and election run where the tensors are. TIES is exact
    against CPU; DARE-TIES and DELLA draw other masks on CUDA (a device generator), so their keep
    rate is checked against the density within 6 standard deviations."""
    from lightning_merge.engine import build_plan, load_inputs, merge_task
    from lightning_merge.methods import get_method
    from lightning_merge.sources import StateDictSource

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 512, generator=g)}
    experts = [{"w": base["w"] + 0.01 * torch.randn(512, 512, generator=g)} for _ in range(3)]
    srcs = [StateDictSource(base, "base")] + [StateDictSource(e, f"e{j}") for j, e in enumerate(experts)]
    for name, kwargs in [("ties", {"density": 0.3}), ("dare_ties", {"density": 0.3, "rescale": "none"}),
                         ("della", {"density": 0.3, "epsilon": 0.1, "rescale": "none"})]:
        method = get_method(name, **kwargs)
        plans = {dev: build_plan(srcs[0], srcs[1:], method, device=dev) for dev in ("cpu", "cuda")}
        task = plans["cpu"].tasks[0]
        inputs = load_inputs(plans["cuda"], task)
        assert inputs.tensors[0].device.type == "cuda"
        got = merge_task(plans["cuda"], task, inputs)
        want = merge_task(plans["cpu"], task)
        if name == "ties":
            assert torch.allclose(got, want, rtol=0, atol=1e-6)
        else:
            changed = (got != base["w"]).double().mean().item()
            expected = (want != base["w"]).double().mean().item()
            assert abs(changed - expected) < 6 * math.sqrt(expected * (1 - expected) / got.numel()) * 2, name
