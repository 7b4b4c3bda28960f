"""``pydensecrf.utils`` drop-in, kept at its familiar path; it lives in :mod:`crfrnn.densecrf.utils`."""
from crfrnn.densecrf.utils import *  # noqa: F401,F403
from crfrnn.densecrf.utils import __all__  # noqa: F401
