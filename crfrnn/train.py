"""The training loop, kept at its familiar path; it lives in :mod:`crfrnn.engine`."""
from crfrnn.engine.train import *  # noqa: F401,F403
from crfrnn.engine.train import __all__  # noqa: F401
