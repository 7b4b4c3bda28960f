"""``check_outputs``: an output may not be an input (however spelled or linked) nor be written twice, and the
check looks at each path once (a folder of N images costs O(N) file-system calls, not O(N^2))."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from crfrnn.cli._common import UsageError, check_outputs


def _files(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"{k:04d}.jpg" for k in range(n)]
    for p in paths:
        p.write_bytes(b"x")
    return paths


def test_outputs_that_are_inputs_by_any_name_are_refused(tmp_path):
    (image,) = _files(tmp_path / "images", 1)
    os.symlink(image, tmp_path / "link.png")
    os.link(image, tmp_path / "hard.png")
    for out in (image, tmp_path / "images" / ".." / "images" / image.name, tmp_path / "link.png",
                tmp_path / "hard.png"):
        with pytest.raises(UsageError, match="refusing to overwrite an input"):
            check_outputs([tmp_path / "fine.png", out], [image])


def test_an_output_written_twice_or_a_folder_is_refused(tmp_path):
    (image,) = _files(tmp_path / "images", 1)
    with pytest.raises(UsageError, match="same file"):
        check_outputs([tmp_path / "a.png", tmp_path / "sub" / ".." / "a.png"], [image])
    (tmp_path / "b.png").write_bytes(b"old")
    os.symlink(tmp_path / "b.png", tmp_path / "c.png")
    with pytest.raises(UsageError, match="same file"):
        check_outputs([tmp_path / "b.png", tmp_path / "c.png"], [image])
    with pytest.raises(UsageError, match="existing folder"):
        check_outputs([tmp_path / "images"], [image])
    check_outputs([tmp_path / "a.png", tmp_path / "b.png"], [image])  # distinct new and existing outputs pass


def test_the_check_is_linear_in_the_number_of_files(tmp_path, monkeypatch):
    """Counted, not timed: every path is looked up a bounded number of times."""
    n = 300
    inputs = _files(tmp_path / "images", n) + _files(tmp_path / "probs", n)
    outputs = [tmp_path / "out" / f"{k:04d}.png" for k in range(n)]
    calls = {"n": 0}
    for name in ("stat", "resolve", "exists", "is_dir"):
        original = getattr(Path, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(Path, name, counted)
    check_outputs(outputs, inputs)
    assert calls["n"] <= 4 * (len(inputs) + len(outputs))  # the old pairwise check made ~2 * n * 2n calls


_FAULTS = """
import resource, sys
import numpy as np
from crfrnn.cli._common import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
for k in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(64 << 20, np.uint8)  # an image's working memory, allocated and freed per image
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc; elsewhere it does nothing")
def test_folder_workers_reuse_freed_memory_instead_of_faulting_it_in_again():
    """The third 64 MB allocation of a folder worker comes from memory the process kept, not from new pages."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 100  # glibc maps and unmaps a block this large each time: the control shows the cost
    assert kept < default / 10
