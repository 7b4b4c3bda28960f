"""The block cache that recycles the compiled kernels' streamed arrays (crfrnn/lattice/_memory.py): a block
is lent again only once nothing references it, the cache keeps to its limit, threads and forks never share a
block, and no result depends on what the recycled memory held."""
import multiprocessing
import threading

import numpy as np
import pytest
import torch
from test_densecrf import _problem

import crfrnn.densecrf as cd
from crfrnn import CrfRnn
from crfrnn.lattice import _memory
from crfrnn.lattice._memory import MIN_CACHED_BYTES, BlockCache, cached_empty

BIG = (MIN_CACHED_BYTES // 4, 3)  # float32: three times the smallest cached size


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("shape", [(5, 9), 7, BIG])
def test_cached_empty_is_a_plain_contiguous_writeable_array(dtype, shape):
    a = cached_empty(shape, dtype)
    want = (shape,) if isinstance(shape, int) else shape
    assert a.shape == want and a.dtype == dtype and a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"]
    a[...] = 3
    assert int(a.sum()) == 3 * a.size
    assert torch.from_numpy(a).sum().item() == 3 * a.size


def test_a_block_is_lent_again_only_after_every_view_and_tensor_of_it_died():
    cache = BlockCache()
    a = cache.empty(BIG)
    ptr, view, tensor = a.ctypes.data, a[::2], torch.from_numpy(a)
    del a
    b = cache.empty(BIG)  # the view and the tensor still hold the first block
    assert b.ctypes.data != ptr and cache.nbytes() == 0
    tensor.fill_(2)
    b[...] = 1
    assert (b == 1).all() and (view == 2).all()
    del view
    assert cache.nbytes() == 0
    del tensor
    assert cache.nbytes() >= 3 * MIN_CACHED_BYTES
    c = cache.empty(BIG)
    assert c.ctypes.data == ptr and cache.nbytes() == 0


def test_arrays_of_nearly_the_same_size_share_a_size_class_and_small_ones_are_not_cached():
    cache = BlockCache()
    n, m = (3 * MIN_CACHED_BYTES - 100_000) // 4, 3 * MIN_CACHED_BYTES // 4 - 1
    assert _memory._size_class(4 * n) == _memory._size_class(4 * m) == 3 * MIN_CACHED_BYTES
    a = cache.empty(n, np.float32)
    ptr = a.ctypes.data
    del a
    b = cache.empty(m, np.float32)
    assert b.ctypes.data == ptr
    c = cache.empty(2 * n, np.float32)  # twice the size: another class, new memory
    assert c.ctypes.data != ptr
    small = cache.empty(16, np.float32)
    del small, b, c
    assert cache.nbytes() == _memory._size_class(4 * n) + _memory._size_class(8 * n)


def test_the_cache_keeps_to_its_limit_freeing_the_oldest_blocks_first():
    size = _memory._size_class(4 * BIG[0] * BIG[1])
    cache = BlockCache(limit_bytes=2 * size)
    arrays = [cache.empty(BIG) for _ in range(3)]
    ptrs = [a.ctypes.data for a in arrays]
    for i in range(3):  # given back in this order: the first one is freed when the third comes back
        arrays[i] = None
    assert cache.nbytes() == 2 * size
    a, b = cache.empty(BIG), cache.empty(BIG)
    assert {a.ctypes.data, b.ctypes.data} == set(ptrs[1:]) and cache.nbytes() == 0
    small_cache = BlockCache(limit_bytes=size - 1)  # a block bigger than the limit is never held
    c = small_cache.empty(BIG)
    del c
    assert small_cache.nbytes() == 0


def test_release_frees_what_the_cache_holds_and_leaves_arrays_in_use_alone():
    cache = BlockCache()
    keep, drop = cache.empty(BIG), cache.empty(BIG)
    keep[...] = 5
    del drop
    held = cache.nbytes()
    assert held > 0 and cache.clear() == held and cache.nbytes() == 0
    assert (keep == 5).all()
    before = _memory.cached_memory_bytes()
    assert _memory.release_cached_memory() == before and _memory.cached_memory_bytes() == 0


def test_threads_never_share_a_block():
    cache, errors = BlockCache(), []

    def work(k):
        rng = np.random.default_rng(k)
        for _ in range(150):
            a = cache.empty((int(rng.integers(1, 4)) * MIN_CACHED_BYTES // 4,), np.int32)
            a[...] = k
            threading.Event().wait(0)  # let another thread run while this one holds its block
            if not (a == k).all():
                errors.append(k)
            del a

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _take_and_give_back(queue):
    a = cached_empty(BIG)
    del a
    queue.put(_memory.cached_memory_bytes())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_a_child_forked_while_the_lock_is_held_still_recycles():
    _memory.release_cached_memory()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with _memory._CACHE._lock:  # as if another thread were inside the cache at the fork
        child = ctx.Process(target=_take_and_give_back, args=(queue,))
        child.start()
        held = queue.get(timeout=60)
        child.join(timeout=60)
    assert child.exitcode == 0 and held >= 3 * MIN_CACHED_BYTES


def _poison_the_cache():
    """Fill every block held for reuse with all-ones bytes (NaN as float32, -1 as an integer) and return
    their addresses."""
    for block in _memory._CACHE._free:
        block.fill_(255)
    return {block.data_ptr() for block in _memory._CACHE._free}


def _record_takes(monkeypatch):
    taken = []
    real = BlockCache._take

    def take(self, size):
        block = real(self, size)
        taken.append(block.data_ptr())
        return block

    monkeypatch.setattr(BlockCache, "_take", take)
    return taken


def _densecrf(img, prob):
    h, w = img.shape[:2]
    d = cd.DenseCRF2D(w, h, prob.shape[0])
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(prob).reshape(prob.shape[0], -1)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)
    return np.array(d.inference(5))


def _layer(layer, unary, image):
    u = unary.clone().requires_grad_()
    out = layer(u, image)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    grads = [u.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return out.detach(), grads


def test_results_do_not_depend_on_what_the_recycled_memory_held(monkeypatch):
    _, img, mask, prob = _problem()  # a generated scene and a noisy softmax of its labels
    assert 24 * 4 * mask.size >= MIN_CACHED_BYTES  # the unary's rows at least go through the cache

    layer = CrfRnn(21)
    unary = torch.from_numpy(np.log(prob))[None]
    image = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None]

    _memory.release_cached_memory()
    want_q, want_layer = _densecrf(img, prob), _layer(layer, unary, image)
    poisoned = _poison_the_cache()
    taken = _record_takes(monkeypatch)
    got_q, got_layer = _densecrf(img, prob), _layer(layer, unary, image)
    assert poisoned & set(taken), "no recycled block was used: the test checks nothing"
    assert np.array_equal(got_q, want_q)
    assert torch.equal(got_layer[0], want_layer[0])
    assert all(torch.equal(g, w) for g, w in zip(got_layer[1], want_layer[1]))
