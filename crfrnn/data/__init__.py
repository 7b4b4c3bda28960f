"""Data: readers, data sets and joint transforms.

* :mod:`.io` — ``read_image``, ``read_mask``, id lists, class names and palettes;
* :mod:`.datasets` — VOC (+SBD), Pascal Context, CamVid and folders of image/mask pairs;
* :mod:`.transforms` — joint (image, mask) transforms and :func:`pad_collate`.
"""
import importlib

#: The modules whose ``__all__`` this package re-exports, imported on first use (PEP 562): the readers of
#: :mod:`.io` need no torch until an image is read as a tensor, so the command line can list and check a
#: folder without it.
_MODULES = (".io", ".datasets", ".transforms")


def __getattr__(name: str):
    if name == "__all__":
        return [n for m in _MODULES for n in importlib.import_module(m, __name__).__all__]
    for m in _MODULES:
        mod = importlib.import_module(m, __name__)
        if name in mod.__all__:
            value = getattr(mod, name)
            globals()[name] = value  # looked up once
            return value
    if f".{name}" in _MODULES:  # a submodule, after a bare ``import crfrnn.data``
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__getattr__("__all__")))
