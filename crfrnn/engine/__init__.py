"""Training and evaluation: the loop, its configuration, run folders, metrics.

Where things are: ``config.py`` (:class:`TrainConfig`), ``train.py`` (:func:`train`: set-up, the loop over
epochs, the hooks), ``step.py`` (:func:`train_step`, parameter groups, the schedule), ``evaluate.py``
(:func:`evaluate`, the forward pass with ``valid_mask``), ``state.py`` (:func:`save_state` /
:func:`load_state`: checkpoint, RNG states, sampler position), ``samplers.py`` (resumable sampler, seeded
loading, collate), ``distributed.py`` (DDP helpers), ``runfiles.py`` (atomic writes, checkpoints,
``metrics.jsonl``), ``metrics.py`` (confusion matrix, IU).
"""
from .evaluate import accepts_valid_mask  # noqa: F401
from .metrics import *  # noqa: F401,F403
from .runfiles import atomic_write, read_metrics, write_metrics  # noqa: F401
from .state import RunSpec, TrainState, load_state, save_state  # noqa: F401
from .step import StepOutput  # noqa: F401
from .train import *  # noqa: F401,F403
