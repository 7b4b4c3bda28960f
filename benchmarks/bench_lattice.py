"""Lattice build/filter times (D=5 bilateral, D=2 spatial; 500x375 and 1000x750; C = 2, 21, 59; both
backends) and pydensecrf2's setup / per-iteration time on the same image, alternating, median ratios.

    python benchmarks/bench_lattice.py            # table on stdout, JSON in benchmarks/results/
    python benchmarks/bench_lattice.py --quick    # 500x375 only
"""
import sys
from pathlib import Path

from crfrnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "lattice.json"
    sys.exit(main(["--only", "lattice", "--json", str(out), *sys.argv[1:]]))
