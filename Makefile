# Two commands do all set-up on a fresh machine (Python 3.10+): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench reproduce clean venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch lies on disk here; installing the pin first keeps pip
	# from pulling a multi-GB CUDA build to satisfy the project's torch>=2.1 range.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.1"
	$(PY) -m pip install -q -e ".[test,keras]"
	# Optional peer for the comparison tests and benchmarks; the suite skips those without it.
	-$(PY) -m pip install -q pydensecrf2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m crfrnn demo

# One pytest worker per core (at most 4: each imports torch and compiles the kernels it needs), a test file per
# worker (pytest-xdist): on a fresh clone most of the suite's time is Numba compiling the kernels, and two workers
# compile different kernels at once (2 cores: 6.4 min instead of 8.5).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# On a quiet machine (nothing else running): times are ratios to pydensecrf2 measured in the same run.
bench: $(STAMP)
	$(PY) benchmarks/bench_lattice.py
	$(PY) benchmarks/bench_meanfield.py
	$(PY) benchmarks/bench_folders.py
	$(PY) benchmarks/bench_growth.py

# The full-resolution reproduction (CamVid + Weizmann horses, 3 seeds, every arm; about an hour on 2 cores):
# writes runs/fullres/, experiments/fullres/results/, experiments/models/ and docs/experiments.md.
reproduce: $(STAMP)
	$(PY) -m experiments.fullres reproduce --runs runs/fullres-$$(date +%Y%m%d-%H%M%S)

clean:
	rm -rf $(VENV) build *.egg-info
