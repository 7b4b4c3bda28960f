"""A drop-in for pydensecrf: ``crfrnn.densecrf`` is ``pydensecrf.densecrf`` (same calls, same results), and
:mod:`crfrnn.densecrf.utils` (also importable as ``crfrnn.utils``) is ``pydensecrf.utils``.

* :mod:`.crf` — :class:`DenseCRF`, :class:`DenseCRF2D`, unaries, compatibilities, normalisations;
* :mod:`._checks` — the argument checks (pydensecrf's argument types, errors naming argument and shape);
* :mod:`._fused` — the CPU fast path (all terms and the softmax in one compiled pass per iteration);
* :mod:`.refine` — :func:`refine`, post-processing in one call;
* :mod:`.utils` — ``unary_from_softmax``, ``create_pairwise_bilateral``, ... (pydensecrf.utils).
"""
from .crf import *  # noqa: F401,F403 - the pydensecrf.densecrf namespace
from .crf import __all__ as _crf_all
from .refine import refine

__all__ = list(_crf_all) + ["refine"]
