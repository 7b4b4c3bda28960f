"""Nothing half-done, nothing silently wrong (issue 13): seeds, resume from the run folder, suspicious inputs,
load errors, one-line usage errors, SIGINT, and training killed (SIGKILL) at random points.

Every refusal is checked for its message, its exit status and the files on disk (none written, none changed).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn.cli import main
from crfrnn.demo import SCENE_CLASSES, make_scene
from crfrnn.engine.runfiles import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = "not a checkpoint this library can load safely (it holds Python objects other than tensors); " \
         "we never unpickle code"


@pytest.fixture(autouse=True)
def _one_thread():
    import numba

    t, n = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(t)
    numba.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ helpers
def scene_folder(folder: Path, seeds, h: int = 32, w: int = 36, names=SCENE_CLASSES) -> Path:
    from crfrnn import viz

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for s in seeds:
        img, mask = make_scene(h, w, seed=s)
        Image.fromarray(img.permute(1, 2, 0).byte().numpy()).save(folder / "images" / f"s{s}.png")
        viz.label_image(mask).save(folder / "masks" / f"s{s}.png")
    if names is not None:
        (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    scene_folder(root / "train", range(6))
    scene_folder(root / "val", [10, 11])
    return root


def train_args(data: Path, run_dir: Path, steps: int = 6, seed: int = 5, *extra) -> list:
    """A short tiny-model run that uses every RNG: random crops and flips, data order, initial weights."""
    return ["train", "--dataset", "folder", "--root", data, "--train-split", "train", "--val-split", "val",
            "--model", "tiny", "--steps", steps, "--batch-size", 2, "--lr", 0.05, "--crop-size", 24,
            "--crf-iterations", 1, "--crf-test-iterations", 1, "--eval-every", 3, "--log-every", 1,
            "--checkpoint-every", 1, "--seed", seed, "--device", "cpu", "--threads", 1, "--quiet",
            "--run-dir", run_dir, *extra]


def cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (contents and modification time)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors_equal(a, b) -> bool:
    """Nested checkpoints equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def same_run(a: Path, b: Path) -> None:
    """Two run folders hold bit-identical checkpoints and the same metrics (but for the time stamps)."""
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        assert ca["step"] == cb["step"], name
        assert tensors_equal(ca, cb), name
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if k != "time"}  # noqa: E731
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)


# ------------------------------------------------------------------------------------------------ 1. seeds
def test_same_seed_same_checkpoints_other_seed_other_weights(tmp_path, data, capsys):
    for name in ("a", "b"):
        rc, _, err = cli(train_args(data, tmp_path / name), capsys)
        assert rc == 0, err
    same_run(tmp_path / "a", tmp_path / "b")
    rc, _, err = cli(train_args(data, tmp_path / "c", 6, 6), capsys)
    assert rc == 0, err
    step0 = [load_checkpoint(tmp_path / n / "last.pt")["model"]["tiny_score.weight"] for n in ("a", "c")]
    assert not torch.equal(*step0)  # the seed does reach the initial weights


# ------------------------------------------------------------------------------------------------ 6. resume
def test_resume_reads_the_run_folder_and_extends_a_finished_run(tmp_path, data, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    rc, _, err = cli(train_args(data, ref, 9, 5, "--schedule", "fixed"), capsys)
    assert rc == 0, err
    rc, _, err = cli(train_args(data, run, 4, 5, "--schedule", "fixed"), capsys)
    assert rc == 0, err
    assert load_checkpoint(run / "last.pt")["step"] == 4

    # flags that contradict the run's settings: refused, naming flag and saved value; nothing changes
    before = snapshot(run)
    rc, _, err = cli(["train", "--run-dir", run, "--resume", "--lr", 0.5, "--crop-size", 12, "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "cannot resume" in err and "--lr 0.5 (the run has 0.05)" in err and "--crop-size" in err
    rc, _, err = cli(["train", "--run-dir", run, "--resume", "--steps", 2, "--quiet"], capsys)
    assert rc == 2 and "has done 4 steps, more than the 2" in err
    assert snapshot(run) == before
    rc, _, err = cli(["train", "--run-dir", tmp_path / "nowhere", "--resume"], capsys)
    assert rc == 2 and "nowhere does not exist" in err and not (tmp_path / "nowhere").exists()

    # no --root, no --model ...: everything from model.json and config.json; a larger --steps extends the run
    rc, out, err = cli(["train", "--run-dir", run, "--resume", "--steps", 9, "--threads", 1, "--quiet"], capsys)
    assert rc == 0, err
    assert "done: 9 steps" in out and json.loads((run / "config.json").read_text())["max_steps"] == 9
    for name in ("last.pt", "best.pt"):  # bit-identical to a run given 9 steps from the start
        assert tensors_equal(load_checkpoint(run / name)["model"], load_checkpoint(ref / name)["model"]), name
    # retyping the original flags (same values) is allowed too; a finished run resumed again changes no weights
    rc, _, err = cli(train_args(data, run, 9, 5, "--schedule", "fixed", "--resume"), capsys)
    assert rc == 0, err
    assert tensors_equal(load_checkpoint(run / "last.pt")["model"], load_checkpoint(ref / "last.pt")["model"])


# ------------------------------------------------------------------------------------------------ 3. wrong data
def test_no_validation_set_is_said_at_start(tmp_path, capsys):
    d = scene_folder(tmp_path / "d", range(4))  # images/ + masks/ at the top: no val split
    run = tmp_path / "run"
    rc, out, err = cli(["train", "--dataset", "folder", "--root", d, "--model", "tiny", "--steps", 2, "--batch-size",
                        2, "--crf-iterations", 1, "--device", "cpu", "--threads", 1, "--quiet", "--run-dir", run],
                       capsys)
    assert rc == 0, err
    assert f"crfrnn: note: no validation set ({d / 'val' / 'images'} does not exist" in err
    assert "writes no best.pt" in err and "validating" not in out
    assert (run / "last.pt").is_file() and not (run / "best.pt").exists()


def test_eval_refuses_a_folder_whose_classes_disagree_with_the_checkpoint(tmp_path, data, capsys):
    rc, _, err = cli(train_args(data, tmp_path / "run", 1), capsys)
    assert rc == 0, err
    horse = scene_folder(tmp_path / "horse", [1, 2], names=["background", "horse"])
    before = snapshot(tmp_path)
    for weights in (tmp_path / "run", tmp_path / "run" / "last.pt"):
        rc, out, err = cli(["eval", "--weights", weights, "--dataset", "folder", "--root", horse, "--quiet"], capsys)
        assert rc == 2 and out == "" and err.count("\n") == 1
        assert f"the checkpoint {tmp_path / 'run'}" in err
        assert "has 6 classes" in err and "class_names.txt lists 2 (background, horse)" in err
    assert snapshot(tmp_path) == before


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, capsys):
    from crfrnn.data import read_image

    grey = np.linspace(0, 65535, 24 * 28).round().astype(np.uint16).reshape(24, 28)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    want = np.floor(grey.astype(np.float64) * 255 / 65535 + 0.5)
    got = read_image(tmp_path / "g16.png").numpy()
    assert got.shape == (3, 24, 28) and all(np.array_equal(got[c], want) for c in range(3))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256  # the whole range, not near-white
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f\.tif.*floating-point"):
        read_image(tmp_path / "f.tif")

    # the CLI reads it the same way: segmenting the 16-bit file equals segmenting its 8-bit scaled copy
    Image.fromarray(want.astype(np.uint8)).save(tmp_path / "g8.png")
    torch.manual_seed(0)
    from crfrnn.models import TinyCrfRnnNet

    torch.save(TinyCrfRnnNet(3, num_iterations=1).state_dict(), tmp_path / "tiny.pt")
    outs = []
    for name in ("g16", "g8"):
        rc, _, err = cli(["segment", tmp_path / f"{name}.png", "--weights", tmp_path / "tiny.pt", "--out",
                          tmp_path / f"out_{name}", "--device", "cpu", "--quiet"], capsys)
        assert rc == 0, err
        outs.append({p.name: np.array(Image.open(p)) for p in sorted((tmp_path / f"out_{name}").glob("*.png"))})
    assert outs[0] and [k.replace("g16", "g8") for k in outs[0]] == list(outs[1])
    assert all(np.array_equal(a, b) for a, b in zip(outs[0].values(), outs[1].values()))


# ------------------------------------------------------------------------------------------------ 5. load errors
class _Evil:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def test_unsafe_and_non_torch_files_are_named_plainly(tmp_path, data, capsys):
    marker = tmp_path / "pwned"
    torch.save({"tiny_score.weight": torch.zeros(1), "boom": _Evil(marker)}, tmp_path / "evil.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"boom": _Evil(marker)}, f, protocol=2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.png")
    image = scene_folder(tmp_path / "imgs", [1], names=None) / "images" / "s1.png"
    before = snapshot(tmp_path)
    for bad, says in ((tmp_path / "evil.pt", UNSAFE), (tmp_path / "evil.pkl", UNSAFE),
                      (tmp_path / "photo.png", "is not a torch file (it is a PNG image)")):
        for argv in (["eval", "--weights", bad, "--dataset", "folder", "--root", data / "val"],
                     ["segment", image, "--weights", bad, "--out", tmp_path / "seg"],
                     ["show-compat", bad, "-o", tmp_path / "c.png"],
                     train_args(data, tmp_path / "run", 2, 5, "--init", bad)):
            rc, out, err = cli(argv, capsys)
            assert rc == 2 and err.count("\n") == 1, (argv, err)
            assert err.startswith(f"crfrnn: error: {bad}") and says in err, err
            assert "weights_only" not in err and "False" not in err
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint: {bad}"):
            load_checkpoint(bad)
    assert snapshot(tmp_path) == before and not marker.exists()

    # a run whose last.pt was replaced: resume refuses it and changes nothing
    rc, _, err = cli(train_args(data, tmp_path / "run", 2), capsys)
    assert rc == 0, err
    os.replace(tmp_path / "evil.pt", tmp_path / "run" / "last.pt")
    before = snapshot(tmp_path / "run")
    rc, _, err = cli(["train", "--run-dir", tmp_path / "run", "--resume", "--steps", 3], capsys)
    assert rc == 2 and f"{tmp_path / 'run' / 'last.pt'}: {UNSAFE}" in err
    assert snapshot(tmp_path / "run") == before and not marker.exists()


# ------------------------------------------------------------------------------------------------ 7. usage, SIGINT
@pytest.mark.parametrize("argv, says", [
    (["train", "--lr", "abc"], "crfrnn: error: train: argument --lr: invalid float value: 'abc'"),
    (["eval", "--weights", "w", "--bogus"], "crfrnn: error: unrecognized arguments: --bogus"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    ([], "crfrnn: error: the following arguments are required: COMMAND"),
    (["train", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, argv, says, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(argv, capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("crfrnn: error:")
    assert says in err and "usage:" not in err
    assert list(tmp_path.iterdir()) == []


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait(proc: subprocess.Popen, ready, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.005)


def _last_step(run: Path) -> int:
    try:
        return int(load_checkpoint(run / "last.pt")["step"])
    except CheckpointError:
        return -1


def test_sigint_exits_130_and_leaves_a_resumable_run(tmp_path, data):
    run = tmp_path / "run"
    # Ctrl-C's default disposition for the child, even when the suite itself runs as a background job (which
    # starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-m", "crfrnn", *map(str, train_args(data, run, 10_000))],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait(proc, lambda: _last_step(run) >= 2, "a checkpoint at step 2")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert (rc, err) == (130, "crfrnn: interrupted\n")
    assert _last_step(run) >= 2 and not list(run.glob(".*.tmp"))


def test_ctrl_c_inside_an_atomic_write_takes_effect_once_the_file_is_in_place(tmp_path):
    from crfrnn.engine.runfiles import atomic_write

    def write(f):
        f.write(b"first half, ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"second half")

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(tmp_path / "out.bin", write)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "out.bin").read_bytes() == b"first half, second half"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


#: ``python SCRIPT N``: N checkpoint writes, each with a SIGINT timed to land at a random point in or near it.
#: Before writes held Ctrl-C back, one landing inside ``torch.save`` ended the process with SIGABRT
#: (torch's unfinished writer writing to the closed file from its destructor) within a few hundred writes.
_INTERRUPTED_WRITES = r"""
import os, random, signal, sys, tempfile, time
import torch
from crfrnn.engine.runfiles import load_checkpoint, save_checkpoint

state = {"model": {f"w{i}": torch.randn(32, 32) for i in range(30)}, "step": 3}
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
path = os.path.join(tempfile.mkdtemp(), "last.pt")
rng, interrupts = random.Random(0), 0
for _ in range(int(sys.argv[1])):
    try:
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0, 0.002))
        save_checkpoint(state, path)
        time.sleep(0.002)
    except KeyboardInterrupt:
        interrupts += 1
    if os.path.exists(path):
        assert load_checkpoint(path)["step"] == 3
print(interrupts)
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
def test_ctrl_c_never_aborts_a_checkpoint_write(tmp_path):
    script = tmp_path / "interrupted_writes.py"
    script.write_text(_INTERRUPTED_WRITES)
    proc = subprocess.run([sys.executable, str(script), "1500"], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert int(proc.stdout) > 500  # most writes were interrupted, each as a KeyboardInterrupt


# ------------------------------------------------------------------------------------------------ 8. SIGKILL
#: ``python SCRIPT DELAY crfrnn-args...``: the command line, with every checkpoint write paused half-way for DELAY
#: seconds (so a kill can land inside one).
_SLOW_WRITES = r"""
import io, sys, time
import torch
import crfrnn.engine.runfiles as runfiles
import crfrnn.engine.state as state

def slow_save(obj, path):
    def write(f):
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(float(sys.argv[1]))
        f.write(data[len(data) // 2 :])
    runfiles.atomic_write(path, write)

state.save_checkpoint = slow_save
from crfrnn.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kill_once(script: Path, argv: list, run: Path, root: Path, after_step: int, in_write: bool, pause: float) -> int:
    """Start training, SIGKILL it after ``last.pt`` reached ``after_step`` (inside the next write of last.pt, or
    ``pause`` seconds later); returns the step of the ``last.pt`` left behind (which must load)."""
    proc = subprocess.Popen([sys.executable, str(script), "0.3" if in_write else "0.02", *map(str, argv)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(proc, lambda: _last_step(run) >= after_step, f"a checkpoint at step {after_step}")
        if in_write:
            _wait(proc, lambda: any(run.glob(".last.pt.*.tmp")), "a write of last.pt")
        else:
            time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = load_checkpoint(run / "last.pt")  # written atomically: complete whatever the moment of the kill
    assert json.loads((run / "model.json").read_text())["options"]["root"] == str(root)  # what --resume reads
    return int(ckpt["step"])


def _fault_injection(tmp_path: Path, data: Path, capsys, kills: int, seed: int) -> None:
    steps = 12
    rc, _, err = cli(train_args(data, tmp_path / "ref", steps), capsys)
    assert rc == 0, err
    script = tmp_path / "slow_writes.py"
    script.write_text(_SLOW_WRITES)
    run = tmp_path / "run"
    rng = random.Random(seed)
    points = sorted(rng.sample(range(1, steps - 1), kills))
    kinds = [True] + [rng.random() < 0.5 for _ in range(kills - 1)]  # at least one kill inside a checkpoint write
    rng.shuffle(kinds)
    resume = ["train", "--run-dir", run, "--resume", "--threads", 1, "--quiet"]  # nothing else: read from the run
    done = -1
    for i, (point, in_write) in enumerate(zip(points, kinds)):
        argv = train_args(data, run, steps) if i == 0 else resume
        after = min(max(point, done + 1), steps - 2)  # progress after every resume, and never past the end
        step = _kill_once(script, argv, run, data, after, in_write, rng.uniform(0, 0.05))
        assert done <= step < steps, (i, point, step)
        done = step
    rc, out, err = cli(resume, capsys)
    assert rc == 0, err
    assert f"done: {steps} steps" in out and not list(run.glob(".*.tmp"))
    same_run(tmp_path / "ref", run)


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, data, capsys):
    _fault_injection(tmp_path, data, capsys, kills=2, seed=13)


@pytest.mark.slow
def test_sigkill_at_five_random_points_then_resume_is_bit_identical(tmp_path, data, capsys):
    _fault_injection(tmp_path, data, capsys, kills=5, seed=7)


def test_eval_accepts_a_class_list_that_also_names_the_void_label(tmp_path, data, capsys):
    """CamVid's class_names.txt lists its 11 classes and then "Unlabelled", the void label 11: with
    --ignore-index 11 that list fits an 11-class checkpoint; with another ignore index it does not."""
    rc, _, err = cli(train_args(data, tmp_path / "run", 1), capsys)
    assert rc == 0, err
    L = len(SCENE_CLASSES)
    folder = scene_folder(tmp_path / "void", [1, 2], names=list(SCENE_CLASSES) + ["Unlabelled"])
    rc, out, err = cli(["eval", "--weights", tmp_path / "run", "--dataset", "folder", "--root", folder,
                        "--ignore-index", str(L), "--json", "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads(out)["class_names"] == list(SCENE_CLASSES)
    rc, out, err = cli(["eval", "--weights", tmp_path / "run", "--dataset", "folder", "--root", folder, "--quiet"],
                       capsys)
    assert rc == 2 and f"lists {L + 1}" in err


def test_an_interrupt_wrapped_by_a_compiled_call_exits_130(capsys):
    """A Ctrl-C that arrives while a Numba function runs surfaces as ``SystemError`` (the function "returned a
    result with an exception set") caused by the ``KeyboardInterrupt``: still an interrupt (130), not a failure."""
    from crfrnn.cli._common import guarded

    def body():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as k:
            raise SystemError("returned a result with an exception set") from k

    assert guarded(body) == 130
    assert capsys.readouterr().err == "crfrnn: interrupted\n"

    def failing():
        raise SystemError("something else")

    assert guarded(failing) == 1
