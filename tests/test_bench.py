"""The benchmark harness's own bookkeeping (not speed: the benchmarks measure that, outside the tests)."""
import os
import time

from crfrnn import bench


def _busy():
    x = 0
    for i in range(3_000_000):  # a fixed amount of work: its CPU time does not depend on preemption
        x += i * i
    return x


def _idle():
    time.sleep(0.15)


def test_alternate_records_each_calls_cpu_time_in_the_order_of_the_functions():
    cpu = []
    t = bench._alternate([_busy, _idle], 3, cpu)
    assert len(t) == len(cpu) == 3 and all(len(r) == len(c) == 2 for r, c in zip(t, cpu))
    for (busy_wall, idle_wall), ((busy_user, busy_sys), (idle_user, idle_sys)) in zip(t, cpu):
        assert idle_wall >= 0.15  # the order of the rounds alternates; each entry stays with its function
        assert busy_user >= 50 and busy_user > 5 * (idle_user + idle_sys)  # ms: the loop ran on the CPU, the sleep not
        assert busy_user <= 1000 * busy_wall + 20 and busy_sys >= 0  # one thread: no more CPU than wall time


def test_alternate_without_a_cpu_list_returns_wall_times_only():
    t = bench._alternate([_idle], 2)
    assert len(t) == 2 and all(r[0] >= 0.15 for r in t)


def test_the_growth_rows_carry_the_cpu_times_and_the_scaling_summary_their_medians():
    rows = bench.bench_densecrf([None], "voc", 1, labels=3, size=(32, 48), rounds=2, iterations=2,
                                base_size=(16, 24))
    key = "growth_over_24x16"
    assert key in rows[0] and rows[0]["user_" + key] > 0 and rows[0]["crfrnn_sys_ms"] >= 0
    at_size = f"growth_over_{bench.SIZE[1]}x{bench.SIZE[0]}"  # the key _scaling reads
    (s,) = bench._scaling([dict(rows[0], **{at_size: rows[0][key], "user_" + at_size: rows[0]["user_" + key]})])
    assert s["user_growth_median"] == rows[0]["user_" + key] and s["sys_ms_median"] == rows[0]["crfrnn_sys_ms"]


def _profile_kernels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_kernels.py"
    spec = importlib.util.spec_from_file_location("profile_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_map_names_numba_functions_and_their_parallel_loops(tmp_path, monkeypatch):
    import weakref

    import numba
    import numpy as np

    prof = _profile_kernels()
    assert prof._readable("_ZN6crfrnn7lattice14_numba_kernels10_build_for12_3clocals_3e6serialB4v132B40c8tJ") == \
        "crfrnn.lattice._numba_kernels._build_for.<locals>.serial v132"
    assert prof._readable("NRT_decref") == "NRT_decref" and prof._readable("_ZN99abcB4v1B") == "_ZN99abcB4v1B"

    def twice(x):  # compiled here, not cached: its module can be listed
        out = np.empty_like(x)
        for i in numba.prange(x.shape[0]):
            out[i] = 2 * x[i]
        return out

    compiled = numba.njit(parallel=True)(twice)
    assert compiled(np.arange(4.0))[3] == 6.0

    class Referent:
        pass

    referent = Referent()
    dead = weakref.proxy(referent)  # among the live objects scanned: touching its __class__ raises ReferenceError
    del referent
    functions = prof._compiled_functions()
    assert type(dead) is weakref.ProxyType
    names = set(functions.values())
    assert any(n.startswith("test_profile_map_names_numba_functions_and_their_parallel_loops.<locals>.twice")
               and n.endswith("/prange#0") for n in names), sorted(names)[:20]
    assert all(isinstance(a, int) and a > 0 for a in functions)
    monkeypatch.setattr(prof.os, "getpid", lambda: f"test-{tmp_path.name}")
    path = prof._write_map({0x1000: "a", 0x1400: "b c"})
    try:
        with open(path) as fh:
            assert fh.read().splitlines() == ["1000 400 a", "1400 10000 b c"]  # start, size (to the next), name
    finally:
        os.unlink(path)
