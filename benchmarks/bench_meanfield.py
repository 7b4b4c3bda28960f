"""crfrnn.densecrf inference against pydensecrf2 (setup + 10 iterations, alternating rounds) on 5 real VOC
images: CRF-RNN's VOC kernels first, then pydensecrf's README kernels; 1 and 2 threads; L = 21, then L = 59
and 1000x750 on the same images; MAP agreement. The CrfRnn layer (T=5) forward and forward + backward against
pydensecrf2's 5 iterations, and its peak RSS in a fresh process.

    python benchmarks/bench_meanfield.py          # tables on stdout, JSON in benchmarks/results/
    python benchmarks/bench_meanfield.py --quick  # 2 images, 500x375 and 21 labels only
"""
import sys
from pathlib import Path

from crfrnn.bench import main

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "results" / "meanfield.json"
    sys.exit(main(["--only", "meanfield", "--only", "memory", "--json", str(out), *sys.argv[1:]]))
