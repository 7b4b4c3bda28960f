"""Lattice build/filter times per kernel (VOC and README bilateral D=5, spatial D=2; 500x375 and 1000x750;
C = 2, 21, 59; the numba backend, and the torch one at 500x375) and pydensecrf2's setup / per-iteration
time on the same image and kernels, alternating, median ratios.

    python benchmarks/bench_lattice.py            # table on stdout, JSON in benchmarks/results/
    python benchmarks/bench_lattice.py --quick    # 500x375 only
"""
import sys
from pathlib import Path

from crfrnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "lattice.json"
    sys.exit(main(["--only", "lattice", "--json", str(out), *sys.argv[1:]]))
