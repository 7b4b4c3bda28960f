"""CRF-RNN Table 1 (and Section 7.1 ablations) at small scale on CamVid, CPU only: the command.

The experiment lives in the package ``experiments/camvid/`` (see its docstring for the design and the modes)::

    python experiments/camvid_table1.py --seed 0 --budget-minutes 45 --run-dir runs/camvid_s0   # one seed
    python experiments/camvid_table1.py --smoke --run-dir /tmp/smoke                            # tiny run
    python experiments/camvid_table1.py --run-dir runs/camvid_s0 --eval-dir /path/to/camvid/test # re-evaluate
    python experiments/camvid_table1.py --report runs/camvid_s0 runs/camvid_s1 -o docs/experiments.md
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the camvid package next to this file, however this file is loaded
    sys.path.insert(0, _HERE)

from camvid.cli import build_parser, main  # noqa: E402,F401
from camvid.common import ABLATIONS, ARMS, NUM_CLASSES  # noqa: E402,F401
from camvid.data import load_split  # noqa: E402,F401
from camvid.model import TinyFCN8s  # noqa: E402,F401
from camvid.run import eval_dir, run_experiment  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
