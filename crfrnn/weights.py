"""Weight loaders, kept at their familiar path; they live in :mod:`crfrnn.models.weights`."""
from crfrnn.models.weights import *  # noqa: F401,F403
from crfrnn.models.weights import __all__  # noqa: F401
