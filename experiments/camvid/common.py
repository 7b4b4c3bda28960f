"""Constants, arms, logging and the experiment's files (all written through
:func:`crfrnn.engine.runfiles.atomic_write`)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crfrnn.data import CAMVID_CLASSES
from crfrnn.engine.metrics import class_iou, mean_class_accuracy, mean_iou, pixel_accuracy
from crfrnn.engine.runfiles import atomic_write

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "camvid"
NUM_CLASSES = len(CAMVID_CLASSES)
IGNORE = 255
HOLD_SEED = 2015  # the held-apart split does not depend on --seed

#: arm name -> table label.
ARMS: dict[str, str] = {
    "fcn": "(a) FCN-8s (tiny, from scratch)",
    "fcn_crf_post": "(b) FCN + dense CRF post-processing (T=10, grid-searched)",
    "crfrnn": "(c) CRF-RNN end to end (T=5 train / T=10 test)",
}
#: ablation name -> (description, CrfRnn kwargs overriding the main arm's, frozen FCN, test iterations).
ABLATIONS: dict[str, tuple[str, dict[str, Any], bool, int]] = {
    "crfrnn_T5": ("(c) tested with T=5 instead of 10 (evaluation only)", {}, False, 5),
    "abl_shared_kernel": (
        "one shared weight per kernel (kernel_weights='shared')", {"kernel_weights": "shared"}, False, 10),
    "abl_perclass_kernel": (
        "per-class kernel weights (kernel_weights='diagonal')", {"kernel_weights": "diagonal"}, False, 10),
    "abl_potts": ("Potts compatibility, fixed (learn_compatibility=False)", {"learn_compatibility": False}, False, 10),
    "abl_untied": ("untied weights per iteration (untied=True)", {"untied": True}, False, 10),
    "abl_frozen_fcn": ("FCN frozen, only the CRF trained", {}, True, 10),
}
MAIN_CRF = {"kernel_weights": "matrix", "learn_compatibility": True, "untied": False}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def metrics_from_conf(conf: torch.Tensor) -> dict[str, Any]:
    nan_none = lambda v: None if v != v else float(v)  # noqa: E731
    return {
        "mean_iou": nan_none(mean_iou(conf)),
        "class_iou": [nan_none(v) for v in class_iou(conf).tolist()],
        "pixel_accuracy": nan_none(pixel_accuracy(conf)),
        "mean_accuracy": nan_none(mean_class_accuracy(conf)),
        "confusion": conf.tolist(),
    }


def atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def atomic_json(path: Path, obj: Any) -> None:
    atomic_bytes(path, (json.dumps(obj, indent=1, allow_nan=False) + "\n").encode("utf-8"))


def save_predictions(path: Path, labels: torch.Tensor, names: list[str]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels.numpy(), names=np.array(names))
    atomic_bytes(path, buf.getvalue())
