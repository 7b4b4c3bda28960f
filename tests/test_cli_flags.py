"""The ``crfrnn train`` flags generated from dataclasses: one flag per ``TrainConfig`` field with the field's
default and help, ``--config`` as the defaults under the command line, and the generator on other dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from PIL import Image

from crfrnn.cli import build_parser, main
from crfrnn.cli import train as train_cmd
from crfrnn.cli._common import UsageError
from crfrnn.cli._dataclass_args import add_dataclass_arguments, given, read_config
from crfrnn.demo import make_scene
from crfrnn.engine.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    t = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(t)


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse(*argv) -> argparse.Namespace:
    return build_parser().parse_args(["train", *map(str, argv)])


def other_value(f: dataclasses.Field, hint):
    """A valid value unlike the field's default, made from its annotation and metadata."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if base is bool:
        return not f.default
    if base is int:
        return 2 if f.default is None else f.default + 1
    if base is float:
        return 0.5 if not f.default else f.default / 2
    if f.name == "device":
        return "cpu"
    raise AssertionError(f"no test value for {f.name}: {hint}")


# ---------------------------------------------------------------------------------------- TrainConfig
def test_one_flag_per_trainconfig_field_with_its_default_and_help():
    t = train_parser()
    by_option = {o: a for a in t._actions for o in a.option_strings}
    group = next(g for g in t._action_groups if g.title.startswith("training"))
    assert {a.dest for a in group._group_actions} == {f.name for f in dataclasses.fields(TrainConfig)}
    help_text = t.format_help()
    for f in dataclasses.fields(TrainConfig):
        action = by_option[flag(f.name)]
        assert action.dest == f.name and action.default is argparse.SUPPRESS
        assert f.metadata["help"].split(";")[0] in " ".join(action.help.split()), f.name
        shown = "none" if f.default is None else str(f.default)
        assert action.help.endswith(f"(default: {shown})"), f.name
        assert flag(f.name) in help_text
    # nothing given: no attribute, so TrainConfig's own defaults apply
    opts, tc = train_cmd.settings(parse())
    assert tc == {} and TrainConfig(**tc) == TrainConfig() and opts == train_cmd.TrainOptions()


def test_every_trainconfig_flag_sets_its_field():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = other_value(f, hints[f.name])
        if hints[f.name] is bool:
            argv = [flag(f.name) if value else "--no-" + f.name.replace("_", "-")]
        else:
            argv = [flag(f.name), value]
        _, tc = train_cmd.settings(parse(*argv))
        assert tc == {f.name: value}, f.name
        assert getattr(TrainConfig(**tc), f.name) == value


def test_optional_numbers_take_none_and_choices_are_checked(capsys):
    assert train_cmd.settings(parse("--grad-clip", "none", "--max-steps", "None"))[1] == {"grad_clip": None,
                                                                                           "max_steps": None}
    assert train_cmd.settings(parse("--steps", 12))[1] == {"max_steps": 12}  # the old name
    with pytest.raises(SystemExit):
        parse("--schedule", "cosine")
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--lr", "fast")
    rc = main(["train", "--run-dir", "unused", "--lr", "-1"])
    assert rc == 2 and "TrainConfig.lr" in capsys.readouterr().err


def test_flags_named_in_the_docs_exist():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("## `crfrnn train`", 1)[1].split("\n## ", 1)[0]
    section = "\n".join(line for line in section.splitlines() if "torchrun --" not in line)  # torchrun's own flags
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section))
    options = {o for a in train_parser()._actions for o in a.option_strings}
    assert len(named) > 20 and named <= options, sorted(named - options)


# --------------------------------------------------------------------------------------------- --config
def test_config_sets_defaults_and_flags_override(tmp_path):
    cfg = {"lr": 0.01, "steps": 7, "model": "tiny", "flip": False, "crf-compat-lr-mult": 3.0, "momentum": 0.5}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    opts, tc = train_cmd.settings(parse("--config", tmp_path / "c.json"))
    assert tc == {"lr": 0.01, "max_steps": 7, "crf_compat_lr_mult": 3.0, "momentum": 0.5}
    assert opts.model == "tiny" and opts.flip is False and opts.dataset == train_cmd.TrainOptions().dataset
    opts, tc = train_cmd.settings(parse("--config", tmp_path / "c.json", "--lr", 0.02, "--flip", "--model", "fcn8s"))
    assert tc["lr"] == 0.02 and tc["max_steps"] == 7 and opts.flip is True and opts.model == "fcn8s"
    # --paper: the recipe, then the file and the flags
    opts, tc = train_cmd.settings(parse("--config", tmp_path / "c.json", "--paper", "--momentum", 0.8))
    cfg = train_cmd._train_config(opts, tc)
    paper = TrainConfig.paper("mean")
    assert (cfg.momentum, cfg.lr, cfg.schedule) == (0.8, 0.01, paper.schedule)
    assert cfg.crf_spatial_lr_mult == paper.crf_spatial_lr_mult and cfg.crf_compat_lr_mult == 3.0


def test_config_errors_name_the_keys(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"lr": 0.1, "stepz": 3, "colour": "red"}))
    with pytest.raises(UsageError, match="unknown key.*colour, stepz"):
        train_cmd.settings(parse("--config", tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    rc = main(["train", "--config", str(tmp_path / "list.json")])
    assert rc == 2 and "JSON object" in capsys.readouterr().err
    rc = main(["train", "--config", str(tmp_path / "missing.json")])
    assert rc == 2 and "missing.json" in capsys.readouterr().err


def test_train_from_flags_alone(tmp_path, capsys, monkeypatch):
    import crfrnn.cli.train as train_command
    from crfrnn import viz

    kept = []  # the training process keeps the memory it frees (each step allocates the same sizes)
    monkeypatch.setattr(train_command, "keep_freed_memory", lambda: kept.append(True))

    for s in (1, 2):
        img, mask = make_scene(36, 40, seed=s)
        for sub in ("images", "masks"):
            (tmp_path / "d" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).byte().numpy()).save(tmp_path / "d" / "images" / f"s{s}.png")
        viz.label_image(mask).save(tmp_path / "d" / "masks" / f"s{s}.png")
    run = tmp_path / "run"
    rc = main(["train", "--dataset", "folder", "--root", str(tmp_path / "d"), "--num-classes", "6", "--model", "tiny",
               "--steps", "2", "--lr", "0.02", "--no-flip", "--crop-size", "32", "--crf-iterations", "1",
               "--crf-test-iterations", "2", "--grad-clip", "5", "--run-dir", str(run), "--device", "cpu", "--quiet",
               "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert kept == [True]
    saved = json.loads(out.out)["config"]
    assert (saved["lr"], saved["max_steps"], saved["grad_clip"], saved["num_classes"]) == (0.02, 2, 5.0, 6)
    assert saved["momentum"] == TrainConfig().momentum  # not given: the dataclass's default
    side = json.loads((run / "model.json").read_text())
    assert side["crf"] == {"num_iterations": 1, "num_test_iterations": 2} and side["model"] == "tiny"


# ------------------------------------------------------------------------------------ any dataclass
@dataclass
class _Example:
    mode: Literal["fast", "slow"] = "fast"
    scale: float | None = None
    count: int = 3
    label: str = "x"
    verbose: bool = False
    ratio: float = field(default=0.5, metadata={"help": "a 50% share"})


def test_generator_on_any_dataclass(tmp_path):
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, _Example)
    assert given(p.parse_args([]), _Example) == {}
    args = p.parse_args(["--mode", "slow", "--scale", "none", "--count", "4", "--label", "none", "--verbose"])
    assert given(args, _Example) == {"mode": "slow", "scale": None, "count": 4, "label": "none", "verbose": True}
    assert given(p.parse_args(["--scale", "2.5"]), _Example) == {"scale": 2.5}
    assert "a 50% share (default: 0.5)" in " ".join(p.format_help().split())
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "medium"])
    (tmp_path / "e.json").write_text(json.dumps({"count": 9, "lr": 1.0}))
    assert read_config(tmp_path / "e.json", [_Example, TrainConfig]) == [{"count": 9}, {"lr": 1.0}]

    @dataclass
    class Bad:
        size: tuple = (1, 2)

    with pytest.raises(TypeError, match="Bad.size"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)
