"""CRF-RNN Table 1 (and Section 7.1 ablations) at small scale on CamVid, CPU only.

The paper (Zheng et al., ICCV 2015, Table 1, VOC 2012 reduced val) reports
FCN-8s 61.3 < FCN-8s + dense CRF as post-processing 63.7 < CRF-RNN trained end to end 69.6 mean IU.
This experiment checks that *ordering* on real data at a scale a 2-core machine can run:

1. a narrow VGG-style FCN-8s (:class:`TinyFCN8s`: five conv stages, pool3/pool4 skips, FCN-8s fusion,
   trained from scratch: no ImageNet weights offline) is trained on CamVid train minus a held-apart part
   (10 %, fixed split) at reduced resolution;
2. arm (a) = that FCN; arm (b) = the same FCN + dense CRF post-processing (:func:`crfrnn.meanfield.mean_field`,
   T = 10, Potts), CRF parameters picked by a small grid search on the held-apart part (never on val);
   arm (c) = CRF-RNN (:class:`crfrnn.models.CrfRnnHead` over a copy of the FCN, initialised with the grid's
   CRF parameters) fine-tuned end to end, T = 5 in training, T = 10 at test;
3. ablations (Section 7.1), each fine-tuned from (a) exactly like (c) except for one thing: shared / per-class
   kernel weights, Potts (fixed) compatibility, untied iterations, frozen FCN (only the CRF learns), and (c)
   tested with T = 5.

Everything is evaluated on CamVid val (101 images) at the working resolution (masks resized by nearest
neighbour). The budget of one seed (``--budget-minutes``, counted in CPU seconds of this process, which runs one
torch and one lattice thread: on a shared machine other jobs' load and pauses then do not eat into it) is split
between the phases after a short timing calibration: the FCN gets ``--fcn-fraction`` of it, the grid search at
most ``--grid-fraction``, the evaluations are reserved from the calibrated (then measured) cost, and the
fine-tuning arms share the rest (main arm 2 shares, each ablation 1). The plan, the CPU and wall-clock time of
every phase and every number go to ``RUN_DIR/results.json``.

Modes::

    python experiments/camvid_table1.py --seed 0 --budget-minutes 45 --run-dir runs/camvid_s0   # one seed
    python experiments/camvid_table1.py --smoke --run-dir /tmp/smoke                            # tiny run
    python experiments/camvid_table1.py --run-dir runs/camvid_s0 --eval-dir /path/to/camvid/test # re-evaluate
    python experiments/camvid_table1.py --report runs/camvid_s0 runs/camvid_s1 -o docs/experiments.md

Modules: ``common`` (constants, arms, logging, files), ``model`` (TinyFCN8s, CRF-RNN heads, prediction),
``data`` (CamVid at the working resolution, held-apart split), ``budget`` (CPU clock, calibration),
``fit`` (training for a number of steps or a time share, through :func:`crfrnn.engine.train`'s hooks),
``run`` (the experiment's phases, ``--eval-dir``), ``report`` (``--report``), ``cli`` (the command line).
"""
