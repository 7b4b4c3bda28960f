"""Folder jobs of ``refine`` and ``segment``: nothing half-done, bad pairs skipped on request, shards, processes.

* Outputs are written into a new hidden folder next to the destination and moved into place only when the
  whole job succeeded (:func:`staged`); a failure or Ctrl-C removes it, so the destination is never left
  with part of a job.
* ``--keep-going`` skips the pairs that fail, names each (file and reason) on stderr, writes the others and
  exits non-zero (:func:`finish`).
* ``--shard K/N`` keeps one deterministic N-th of the sorted items (every N-th, starting at the K-th), so
  the N shards together are the whole folder.
* ``--workers N`` spreads the items over N processes (spawned, one CPU thread each); each item's result
  depends only on its own inputs, so the outputs are the same for any N.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ._args import positive_int
from ._common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    THREAD_ENV,
    USER_ERRORS,
    keep_freed_memory,
    progress,
    rank,
    say,
    thread_variables,
)


# ------------------------------------------------------------------------------------------------- flags
def parse_shard(text: str) -> tuple[int, int]:
    """``--shard K/N`` -> (K, N) with 1 <= K <= N."""
    try:
        k, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (this is shard K of N, 1 <= K <= N), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {text!r}")
    return k, n


def add_folder_flags(p: argparse.ArgumentParser, workers: bool) -> None:
    """``--keep-going``, ``--shard K/N`` and (``workers``) ``--workers N``."""
    g = p.add_argument_group("folders")
    g.add_argument("--keep-going", action="store_true",
                   help="skip pairs that fail (named on stderr), write the others, exit non-zero; without it a "
                        "failing pair stops the job and nothing is written")
    g.add_argument("--shard", type=parse_shard, default=None, metavar="K/N",
                   help="process only shard K of N (1 <= K <= N): every N-th input in sorted order, starting at "
                        "the K-th; the N shards together cover the folder once")
    if workers:
        g.add_argument("--workers", type=positive_int, default=1, metavar="N",
                       help="spread the images over N processes with one CPU thread each (--threads sets the "
                            "threads per process); outputs do not depend on N")


def take_shard(items: Sequence, shard: tuple[int, int] | None) -> list:
    """The items of shard ``(K, N)``: every N-th item, starting at the K-th (all items for ``None``)."""
    if shard is None:
        return list(items)
    k, n = shard
    return list(items[k - 1 :: n])


def warn(text: str) -> None:
    """A warning on stderr (also with --json and --quiet: it is about the user's data)."""
    if rank() == 0:
        print(f"crfrnn: warning: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ staging
@contextlib.contextmanager
def staged(dest: Path) -> Iterator[Path]:
    """A new empty folder next to ``dest`` to write the job's files into. On normal exit its files are moved into
    ``dest`` (a new ``dest`` appears at once, by one rename); on an exception the folder is removed and ``dest``
    is untouched. The name is unique, so shards writing to one ``dest`` at the same time do not clash."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.partial"
    stage.mkdir()  # honours the umask (mkdtemp would make it 0700, and the rename would keep that)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _commit(stage, dest)


def _commit(stage: Path, dest: Path) -> None:
    names = sorted(p.name for p in stage.iterdir())
    if not names:
        stage.rmdir()
        return
    if not dest.exists():
        with contextlib.suppress(OSError):  # another shard made dest meanwhile: move file by file
            os.rename(stage, dest)
            return
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(stage / name, dest / name)
    stage.rmdir()


# -------------------------------------------------------------------------------------------------- running
def _attempt(work: Callable[[Any], dict], item) -> tuple[bool, Any]:
    """(True, record) or (False, the exception): a failure travels back to the parent as a value."""
    try:
        return True, work(item)
    except Exception as e:  # noqa: BLE001 - reported by the parent, which decides to stop or skip
        try:
            import pickle

            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an exception that cannot cross the process boundary
            e = RuntimeError(f"{type(e).__name__}: {e}")
        return False, e


def _init_worker(threads: int) -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool and cleans up
    keep_freed_memory()

    torch.set_num_threads(threads)
    with contextlib.suppress(ImportError, ValueError):
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


@contextlib.contextmanager
def _thread_env(threads: int) -> Iterator[None]:
    """The thread-count variables set while worker processes start (they read them when importing torch)."""
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update(thread_variables(threads))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _outcomes(work, items: list, workers: int, threads: int) -> Iterator[tuple[bool, Any]]:
    """(ok, record-or-exception) per item, in the items' order. A worker that dies (a crash, the OOM killer)
    raises ``BrokenProcessPool`` here instead of leaving the job waiting for it."""
    if workers <= 1 or len(items) <= 1:
        keep_freed_memory()
        for item in items:
            yield _attempt(work, item)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP / numba thread pools
    pool = ProcessPoolExecutor(min(workers, len(items)), mp_context=ctx, initializer=_init_worker,
                               initargs=(threads,))
    done = False
    try:
        with _thread_env(threads):  # the workers start while the tasks are submitted
            futures = [pool.submit(_attempt, work, item) for item in items]
        for f in futures:
            yield f.result()
        done = True
    finally:
        if done:
            pool.shutdown(wait=True)
        else:
            _stop(pool)


def _stop(pool) -> None:
    """Stop the pool now (after a failure without --keep-going, or Ctrl-C): queued items are dropped and running
    ones killed rather than waited for."""
    procs = getattr(pool, "_processes", None)  # private, but the executor has no public way to kill its workers
    processes = list(procs.values()) if isinstance(procs, dict) else []
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout=10)


class Failure(dict):
    """One skipped item: ``{"item": ..., "error": one line}`` plus whether it was the user's mistake."""


def failure(item: str, error: BaseException) -> Failure:
    f = Failure(item=item, error=" ".join(str(error).split()) or type(error).__name__)
    f.user = isinstance(error, USER_ERRORS)
    return f


def say_skipped(f: Failure) -> None:
    if rank() == 0:
        print(f"crfrnn: skipped {f['item']}: {f['error']}", file=sys.stderr, flush=True)


def run_items(work: Callable[[Any], dict], items: list, args, *, desc: str, name: Callable[[Any], str],
              workers: int = 1, threads: int = 1) -> tuple[list[dict], list[Failure], float]:
    """Run ``work`` on every item (in ``workers`` processes); -> (records, failures, seconds). A failure raises
    at once unless ``args.keep_going``; then it is named on stderr and skipped. Records' ``"warnings"`` are
    printed on stderr as they arrive (in the items' order)."""
    t0 = time.perf_counter()
    records: list[dict] = []
    failures: list[Failure] = []
    stream = _outcomes(work, items, workers, threads)
    try:
        for item, (ok, value) in zip(items, progress(stream, args, desc=desc, total=len(items))):
            if ok:
                for w in value.pop("warnings", ()):
                    warn(w)
                message = value.pop("message", None)
                if message:
                    say(args, message)
                records.append(value)
                continue
            if not getattr(args, "keep_going", False):
                raise value
            failures.append(failure(name(item), value))
            say_skipped(failures[-1])
    finally:
        stream.close()
    return records, failures, time.perf_counter() - t0


def finish(args, failures: list[Failure], total: int, written: int, dest) -> int:
    """The exit status of a job; with failures, one summary line on stderr (2 if all were the user's files)."""
    if not failures:
        return EXIT_OK
    if rank() == 0:
        print(f"crfrnn: error: {len(failures)} of {total} inputs failed and were skipped (--keep-going); "
              f"{written} written to {dest}", file=sys.stderr, flush=True)
    return EXIT_USAGE if all(f.user for f in failures) else EXIT_FAILURE


def report_rate(args, what: str, count: int, seconds: float, workers: int) -> float:
    """Say (and return) the throughput in items per second."""
    rate = count / seconds if seconds > 0 else 0.0
    procs = f", {workers} processes" if workers > 1 else ""
    say(args, f"{count} {what} in {seconds:.1f} s: {rate:.2f} {what}/s{procs}")
    return rate
