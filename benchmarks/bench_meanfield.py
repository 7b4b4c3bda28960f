"""crfrnn.densecrf inference vs pydensecrf2 (setup + 10 iterations, 500x375, 21 labels, alternating),
CrfRnn forward vs forward+backward (T=5), and the peak RSS of CrfRnn forward+backward in a fresh process.

    python benchmarks/bench_meanfield.py          # table on stdout, JSON in benchmarks/results/
"""
import sys
from pathlib import Path

from crfrnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "meanfield.json"
    sys.exit(main(["--only", "meanfield", "--only", "memory", "--json", str(out), *sys.argv[1:]]))
