"""Helpers shared by the subcommands: output (text / ``--json`` / progress bars), device and threads, checks of
the user's files and output paths, class names and palettes, and the one-line error handling of ``main``."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
#: Exceptions that are the user's mistake (exit status 2); anything else is a failure (exit status 1).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)
#: Environment variables that fix the thread pools of a process (a folder job's workers) before torch / numba
#: are imported.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def thread_variables(n: int) -> dict[str, str]:
    """:data:`THREAD_ENV`, each set to ``n`` threads."""
    return {k: str(n) for k in THREAD_ENV}


class UsageError(ValueError):
    """A mistake in the command line or the user's files (exit status 2)."""


# ------------------------------------------------------------------------------------------------ output
def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def say(args, text: str) -> None:
    """Human-readable output (stdout), suppressed by --json (which prints one JSON document instead)."""
    if not getattr(args, "json", False) and rank() == 0:
        print(text, flush=True)


def note(args, text: str) -> None:
    """Something the user should know that is not an error (stderr, ``crfrnn: note: ...``; also with --json)."""
    if rank() == 0:
        print(f"crfrnn: note: {text}", file=sys.stderr, flush=True)


def emit_json(args, payload: Any) -> None:
    if getattr(args, "json", False) and rank() == 0:
        print(json.dumps(payload, indent=2, allow_nan=False, default=_json_default), flush=True)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def finite(x):
    """NaN -> None for JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def show_progress(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty() and rank() == 0


def progress(iterable, args, **kw):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not show_progress(args), dynamic_ncols=True, leave=False, **kw)


# ------------------------------------------------------------------------------------------ device, threads
def device(spec: str | None):
    """``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    spec = spec or "auto"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: only cpu and cuda devices are supported")
    return dev


def set_threads(n: int) -> None:
    """``--threads``: CPU threads of torch and of the compiled lattice kernels. Before either is imported (the
    parent of a folder job, which only hands out work, never imports them), the variables they read when
    imported."""
    if "torch" not in sys.modules and "numba" not in sys.modules:
        os.environ.update(thread_variables(n))
        return
    import torch

    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass


# ---------------------------------------------------------------------------------------- the user's files
def _identity(path: Path):
    """What makes two paths one file: the (device, inode) of an existing file (links, hard links and
    different spellings agree), else the absolute path with symbolic links resolved."""
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:
        return path.resolve()


def check_outputs(outputs: Sequence[Path], inputs: Iterable[Path]) -> None:
    """Refuse outputs that are inputs, folders, or written twice -- before anything is written. One look at
    each path (a folder job of N images checks in O(N), not O(N^2))."""
    input_of: dict = {}
    for inp in inputs:
        input_of.setdefault(_identity(Path(inp)), Path(inp))
    seen: dict = {}
    for out in outputs:
        out = Path(out)
        if out.is_dir():
            raise UsageError(f"output {out} is an existing folder, expected a file path")
        key = _identity(out)
        if key in input_of:
            raise UsageError(f"output {out} is the input file {input_of[key]}; refusing to overwrite an input")
        if key in seen:
            raise UsageError(f"two results would be written to the same file {out}")
        seen[key] = out


def check_png_suffix(path: Path) -> None:
    from PIL import Image

    if Image.registered_extensions().get(path.suffix.lower()) is None:
        raise UsageError(f"output {path}: unknown picture format {path.suffix!r}; use .png")


def check_out_dir(out_dir: Path) -> None:
    """``--out DIR`` must be a folder or not exist yet."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (:data:`crfrnn.data.IMAGE_EXTENSIONS`), sorted by name."""
    from crfrnn.data.io import IMAGE_EXTENSIONS, _index_dir

    return list(_index_dir(folder, IMAGE_EXTENSIONS, "image").values())


def need_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, expected a file")
    return path


def read_names_file(path: Path) -> list[str]:
    """Class names, one per line (blank lines skipped)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ class names, palettes
def class_names_for(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """``names`` if long enough, else the known data sets' names with ``num_classes`` classes, else numbers."""
    from crfrnn import data
    from crfrnn.demo import SCENE_CLASSES

    if names is not None and len(names) >= num_classes:
        return [str(n) for n in names[:num_classes]]
    for known in (data.VOC_CLASSES, data.CAMVID_CLASSES, data.PASCAL_CONTEXT_CLASSES):
        if len(known) == num_classes:
            return list(known)
    if num_classes == len(SCENE_CLASSES):
        return list(SCENE_CLASSES)
    return [str(k) for k in range(num_classes)]


def palette_for(name: str, num_classes: int, class_names: Sequence[str] | None = None):
    """``--palette``: ``auto`` picks CamVid's colours for CamVid's classes, else VOC's (distinct beyond 256)."""
    from crfrnn import data, viz

    if name == "auto":
        if class_names is not None and tuple(class_names[:11]) == tuple(data.CAMVID_CLASSES):
            name = "camvid"
        else:
            name = "voc" if num_classes <= 256 else "distinct"
    return viz.palette(name, max(256, num_classes))


# ------------------------------------------------------------------------------------------- error handling
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text


def _interrupted(e: BaseException) -> bool:
    """Whether ``e`` stems from a Ctrl-C: a compiled (Numba) call that returns while the interrupt is pending
    raises ``SystemError`` with the ``KeyboardInterrupt`` as its cause."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def guarded(body: Callable[[], int]) -> int:
    """Run ``body``; turn every exception into one line on stderr and an exit status (2 for the user's
    mistakes, 1 otherwise, 130 on Ctrl-C). ``CRFRNN_DEBUG=1`` lets the traceback through."""
    debug = os.environ.get("CRFRNN_DEBUG", "") not in ("", "0")
    try:
        return body()
    except KeyboardInterrupt:
        print("crfrnn: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"crfrnn: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the top level turns every failure into one line
        if _interrupted(e):
            print("crfrnn: interrupted", file=sys.stderr)
            return 130
        if debug:
            raise
        print(f"crfrnn: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE


def keep_freed_memory() -> None:
    """Let this process's allocator keep the memory it frees, for the next item (glibc; elsewhere nothing).

    By default glibc hands large freed blocks straight back to the kernel (``mmap`` above a threshold, and it
    trims the top of the heap), so every image of a folder faults its working memory in again: ~5000 faults per
    VOC image (T=10), ~100 with this setting. At ~3.4 µs a fault on our VMs that is ~17 ms, ~3 % of an image.
    Only the command line calls it, in processes of its own: folder jobs (their workers, or the ``crfrnn``
    command's process) and ``crfrnn train``, whose steps allocate the same sizes each time (the CRF-RNN layer's
    forward + backward at 500x375, T=5: 30-160 ms of system time per step with glibc's default, none kept)."""
    with contextlib.suppress(Exception):  # no glibc (macOS, Windows): keep the platform's allocator as it is
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        if not mallopt(m_mmap_threshold, 1 << 30):
            mallopt(m_mmap_threshold, 32 << 20)  # the largest value older glibc accepts
        mallopt(m_trim_threshold, 2**31 - 1)
