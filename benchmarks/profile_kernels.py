"""Where the compiled kernels spend their time: a `perf` symbol map for Numba's JIT code.

`perf record -e cpu-clock` samples work on these VMs (they have no hardware counters), but Numba's compiled code
shows as ``[JIT]`` addresses without names. This script runs ``crfrnn.densecrf`` (setup + ``inference(10)``, as
``make bench`` does) on one VOC image, then writes ``/tmp/perf-PID.map``, which ``perf report`` reads: every
function compiled in this process, each parallel loop (Numba outlines every ``prange`` loop into a function of
its own) named after the function that holds it and numbered in compile order, which follows the source, the
loops of inlined helpers included (``_dense_meanfield/prange#7``: its pass over the points). Only functions
compiled in this process can be listed: ones loaded from Numba's on-disk cache carry no LLVM module, so run it
with an empty cache (it then compiles for a minute or two, which ``perf report --dsos`` leaves out):

    NUMBA_CACHE_DIR=$(mktemp -d) perf record -e cpu-clock -F 2000 -o /tmp/p.data \\
        python benchmarks/profile_kernels.py --kernels readme --size 750 1000 --calls 8
    perf report -i /tmp/p.data --no-children --sort sym --dsos '[JIT] tid PID'   # PID as printed
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections import defaultdict

from numba.core.registry import CPUDispatcher

_LOOP = re.compile(r"__numba_parfor_gufunc_0x[0-9a-f]+B\d+v(\d+)B")


def _readable(name: str) -> str:
    """A Numba-mangled name (``_ZN6crfrnn7lattice...B4v132B...``) as a dotted path and its compile number:
    ``crfrnn.lattice._numba_kernels._build_for.<locals>.serial v132``; other names unchanged."""
    if not name.startswith("_ZN"):
        return name
    parts, pos = [], 3
    while pos < len(name) and name[pos].isdigit():  # length-prefixed parts, read in one pass
        digits = re.match(r"\d+", name[pos:]).group(0)
        pos += len(digits)
        parts.append(name[pos:pos + int(digits)])
        pos += int(digits)
    version = re.match(r"B\d+v(\d+)", name[pos:])
    if not parts or version is None or pos > len(name):
        return name
    # Numba escapes characters outside [A-Za-z0-9_] as _XX (hex) and leaves "_" itself alone, so only the
    # escapes of <locals> are undone (any _XX would turn test_bench into test\xbench)
    return ".".join(parts).replace("_3clocals_3e", "<locals>") + f" v{version.group(1)}"


def _compiled_functions() -> dict:
    """``{address: name}`` of every function compiled in this process, parallel loops named after their holder."""
    owners = defaultdict(set)  # function name -> the Python functions whose library defines it
    addresses = {}
    # type(), not isinstance: isinstance reads __class__, which a dead weak proxy answers with ReferenceError
    # (and some of torch's lazy objects with a deprecation warning)
    dispatchers = [o for o in gc.get_objects() if issubclass(type(o), CPUDispatcher)]
    for disp in dispatchers:
        for cres in disp.overloads.values():
            lib = cres.library
            try:
                functions = [f for f in lib.get_defined_functions() if not f.is_declaration]
            except Exception:  # loaded from the on-disk cache: no module to list
                continue
            for f in functions:
                address = lib.get_pointer_to_function(f.name)
                if address:
                    addresses[f.name] = address
                    owners[f.name].add(disp.py_func.__qualname__)
    loops = {}  # a parallel loop's function -> (its holder, its compile number)
    for name, held_by in owners.items():
        m = _LOOP.search(name)
        if m:
            loops[name] = ("|".join(sorted(held_by)), int(m.group(1)))
    numbers = defaultdict(list)  # holder -> its loops' compile numbers, in order
    for holder, v in sorted(set(loops.values())):
        numbers[holder].append(v)
    labels = {}
    for name, (holder, v) in loops.items():
        label = f"{holder}/prange#{numbers[holder].index(v)}"
        # the loop's body, or Numba's wrapper that runs it over a thread's share (the body itself when LLVM
        # inlined it there)
        wrapped = name.startswith("__gufunc__.") and name[len("__gufunc__."):] in owners
        labels[name] = label + " (wrapper)" if wrapped else label
    return {address: labels.get(name, _readable(name)) for name, address in addresses.items()}


def _write_map(functions: dict) -> str:
    path = f"/tmp/perf-{os.getpid()}.map"
    starts = sorted(functions)
    with open(path, "w") as fh:
        for a, b in zip(starts, starts[1:] + [starts[-1] + (1 << 16)]):
            fh.write(f"{a:x} {min(b - a, 1 << 20):x} {functions[a]}\n")  # sized up to the next function
    return path


def main(argv=None) -> None:
    from crfrnn import bench, densecrf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", choices=sorted(bench.kernel_sets()), default="readme")
    ap.add_argument("--size", type=int, nargs=2, default=list(bench.SIZE), metavar=("H", "W"))
    ap.add_argument("--calls", type=int, default=8, help="timed calls after the first (default 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image", type=int, default=10, help="index into bench.voc_images (default 10, held out)")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.threads < 1 or args.image < 0 or min(args.size) < 1:
        ap.error("--calls, --threads and --size must be positive, --image non-negative")
    images = bench.voc_images(args.image + 1)
    if len(images) <= args.image:
        sys.exit(f"no VOC image {args.image}: the sample in ../shared/data has {len(images)} of that size")
    case = bench._case(images[args.image], tuple(args.size), 21)
    kernels = bench.kernel_sets()[args.kernels]
    with bench.threads(args.threads):
        bench._densecrf(densecrf, *case, kernels, 10)  # compiles
        t0 = time.perf_counter()
        for _ in range(args.calls):
            bench._densecrf(densecrf, *case, kernels, 10)
        ms = 1000 * (time.perf_counter() - t0) / args.calls
    functions = _compiled_functions()
    if not functions:
        sys.exit("no compiled functions to map: run with an empty NUMBA_CACHE_DIR (see the module docstring)")
    path = _write_map(functions)
    print(f"pid {os.getpid()}: {ms:.0f} ms a call ({args.calls} calls), {len(functions)} functions mapped in {path}")


if __name__ == "__main__":
    main()
