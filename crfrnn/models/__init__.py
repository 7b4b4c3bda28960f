"""The networks and everything that loads them.

* :mod:`.fcn8s` — :class:`FCN8s` (VGG-16, Caffe layout), input normalisation;
* :mod:`.nets` — :class:`CrfRnnNet` (FCN-8s + CRF-RNN), :class:`CrfRnnHead`, :class:`TinyCrfRnnNet`,
  :class:`UnaryNet` (a model at a unary scale, no CRF);
* :mod:`.small_fcn8s` — :class:`SmallFCN8s`, a narrow FCN-8s trained from scratch (the CamVid experiment's);
* :mod:`.checkpoints` — :func:`~.checkpoints.load_model` for every checkpoint kind, and the single-file format
  of shipped models (:func:`~.checkpoints.save_model_file`);
* :mod:`.weights` — the published CRF-RNN weights (PyTorch, Keras) and VGG-16 initialisation.
"""
from .fcn8s import IMAGENET_MEAN_RGB, FCN8s, bilinear_upsampling_weights, caffe_normalize
from .nets import CrfRnnHead, CrfRnnNet, TinyCrfRnnNet, UnaryNet
from .small_fcn8s import CAMVID_MEAN, CAMVID_STD, SmallFCN8s

__all__ = [
    "IMAGENET_MEAN_RGB",
    "caffe_normalize",
    "bilinear_upsampling_weights",
    "FCN8s",
    "CrfRnnNet",
    "CrfRnnHead",
    "TinyCrfRnnNet",
    "UnaryNet",
    "SmallFCN8s",
    "CAMVID_MEAN",
    "CAMVID_STD",
]
