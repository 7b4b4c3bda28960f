"""The networks and everything that loads them.

* :mod:`.fcn8s` — :class:`FCN8s` (VGG-16, Caffe layout), input normalisation;
* :mod:`.nets` — :class:`CrfRnnNet` (FCN-8s + CRF-RNN), :class:`CrfRnnHead`, :class:`TinyCrfRnnNet`;
* :mod:`.weights` — the published CRF-RNN weights (PyTorch, Keras) and VGG-16 initialisation.
"""
from .fcn8s import IMAGENET_MEAN_RGB, FCN8s, bilinear_upsampling_weights, caffe_normalize
from .nets import CrfRnnHead, CrfRnnNet, TinyCrfRnnNet

__all__ = [
    "IMAGENET_MEAN_RGB",
    "caffe_normalize",
    "bilinear_upsampling_weights",
    "FCN8s",
    "CrfRnnNet",
    "CrfRnnHead",
    "TinyCrfRnnNet",
]
