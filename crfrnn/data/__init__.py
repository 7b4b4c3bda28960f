"""Data: readers, data sets and joint transforms.

* :mod:`.io` — ``read_image``, ``read_mask``, id lists, class names and palettes;
* :mod:`.datasets` — VOC (+SBD), Pascal Context, CamVid and folders of image/mask pairs;
* :mod:`.transforms` — joint (image, mask) transforms and :func:`pad_collate`.
"""
from .datasets import *  # noqa: F401,F403
from .datasets import __all__ as _datasets_all
from .io import *  # noqa: F401,F403
from .io import __all__ as _io_all
from .transforms import *  # noqa: F401,F403
from .transforms import __all__ as _transforms_all

__all__ = list(_io_all) + list(_datasets_all) + list(_transforms_all)
