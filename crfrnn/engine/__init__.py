"""Training and evaluation: the loop, its configuration, run folders, metrics."""
from .metrics import *  # noqa: F401,F403
from .train import *  # noqa: F401,F403
