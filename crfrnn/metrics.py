"""Segmentation metrics, kept at their familiar path; they live in :mod:`crfrnn.engine.metrics`."""
from crfrnn.engine.metrics import *  # noqa: F401,F403
from crfrnn.engine.metrics import __all__  # noqa: F401
