"""Checkpoint files: cxrdx-checkpoint/2 (safetensors + JSON header) never unpickles; old pickle files load only when trusted."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cxrdx.checkpoint import (
    FORMAT,
    PICKLE_FORMAT,
    Checkpoint,
    PickleCheckpointWarning,
    load_checkpoint,
    load_train_state,
    save_checkpoint,
)
from cxrdx.cli import main
from cxrdx.config import load_config, save_config
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.models import create_model
from cxrdx.ood import fit_guard

SIZE = 64


class WritesFile:
    """Unpickles as `Path.write_text(target, ...)`: the stand-in for code hidden in a shared checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "unpickled"))


def tiny_checkpoint(**fields) -> Checkpoint:
    torch.manual_seed(0)
    model = create_model("test_resnet", pretrained="none", num_findings=len(FINDINGS))
    return Checkpoint(
        model_name="test_resnet", state_dict=model.state_dict(), input_size=32, mean=[0.5], std=[0.25], cache_size=SIZE, **fields
    )


def save_pickle_checkpoint(path: Path, checkpoint: Checkpoint, **extra) -> Path:
    """A checkpoint as cxrdx wrote them before format 2: one torch.save pickle of the fields."""
    payload = {f.name: getattr(checkpoint, f.name) for f in dataclasses.fields(checkpoint)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**payload, **extra, "format": PICKLE_FORMAT}, path)
    return path


def image(folder: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "chest.png")
    return folder / "chest.png"


def every_field() -> Checkpoint:
    """No field at its default, a tuple among the JSON values, an int64 buffer among the tensors."""
    return tiny_checkpoint(
        model_kwargs={"drop_rate": 0.25},
        findings=list(FINDINGS),
        thresholds=[0.1 * (i % 9) for i in range(14)],
        temperature=[1.0 + i / 10 for i in range(14)],
        config={"data": {"cache": "cache/x", "mean": (0.5,)}, "seed": 3},
        val_metrics={"loss": 0.25, "auroc": {"Mass": None, "Hernia": 0.75}, "auc": np.float64(0.5)},
        epoch=7,
        cxrdx_version="9.8.7",
        preprocess="xrv",
        provenance={"source": "chexnet", "sha256": "0" * 64},
        guard=fit_guard(np.random.default_rng(0).normal(size=(50, 96)), np.random.default_rng(1).normal(size=(20, 96))),
    )


def test_every_field_round_trips(tmp_path: Path):
    original = every_field()
    path = save_checkpoint(tmp_path / "best.pt", original)
    loaded = load_checkpoint(path)
    for f in dataclasses.fields(Checkpoint):
        if f.name != "state_dict":
            assert getattr(loaded, f.name) != f.default, f"{f.name} is at its default: the test would not see it lost"
    expected = {
        **{f.name: getattr(original, f.name) for f in dataclasses.fields(Checkpoint)},
        "config": {"data": {"cache": "cache/x", "mean": [0.5]}, "seed": 3},  # JSON: a tuple comes back a list
        "val_metrics": {"loss": 0.25, "auroc": {"Mass": None, "Hernia": 0.75}, "auc": 0.5},
    }
    for name, value in expected.items():
        if name not in ("state_dict", "guard"):
            assert getattr(loaded, name) == value, name
    assert loaded.guard.header() == original.guard.header()
    assert all(np.array_equal(getattr(loaded.guard, a), getattr(original.guard, a)) for a in ("mean", "projection", "precision"))
    assert loaded.state_dict.keys() == original.state_dict.keys()
    for key, tensor in original.state_dict.items():
        assert loaded.state_dict[key].dtype == tensor.dtype and torch.equal(loaded.state_dict[key], tensor), key
    assert any(t.dtype == torch.int64 for t in loaded.state_dict.values())  # batch norm's num_batches_tracked

    # a plain safetensors file: any safetensors reader gets the weights; the header is one JSON string
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT and json.loads(metadata["checkpoint"])["epoch"] == 7
    assert load_file(path).keys() == original.state_dict.keys() | original.guard.tensors().keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = save_checkpoint(tmp_path / "best.pt", tiny_checkpoint())

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    model = load_checkpoint(path).build_model()
    assert not model.training


@pytest.fixture
def forged(tmp_path: Path) -> tuple[Path, Path]:
    """RUN/ with a pickle best.pt and last.pt that predict normally but write MARKER when unpickled."""
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt"):
        save_pickle_checkpoint(
            run / "checkpoints" / name, tiny_checkpoint(config={"data": {"cache": str(tmp_path)}}), val_metrics={"loss": WritesFile(marker)}
        )
    save_config(load_config(None, [f"out={run}", "model.name=test_resnet", f"data.cache={tmp_path}"]), run / "config.yaml")
    return run, marker


def test_the_forged_checkpoint_runs_its_code_when_trusted(forged: tuple[Path, Path]):
    run, marker = forged
    with pytest.warns(PickleCheckpointWarning, match="unpickling"):
        ckpt = load_checkpoint(run / "checkpoints" / "best.pt", trust_pickle=True)
    assert marker.read_text() == "unpickled"  # the payload of the refusal tests is live
    assert ckpt.model_name == "test_resnet" and ckpt.build_model() is not None


COMMANDS = {
    "predict": lambda ckpt, tmp: ["predict", "--checkpoint", ckpt, str(image(tmp))],
    "serve": lambda ckpt, tmp: ["serve", "--checkpoint", ckpt, "--port", "1"],
    "serve --workers": lambda ckpt, tmp: ["serve", "--checkpoint", ckpt, "--port", "1", "--workers", "2"],
    "export": lambda ckpt, tmp: ["export", "--checkpoint", ckpt, "--onnx", str(tmp / "model.onnx")],
    "explain": lambda ckpt, tmp: ["explain", "--checkpoint", ckpt, str(image(tmp)), "--out", str(tmp / "explain")],
    "localize": lambda ckpt, tmp: ["localize", "--checkpoint", ckpt, "--boxes", str(boxes(tmp)), "--data-dir", str(tmp)],
    "evaluate": lambda ckpt, tmp: ["evaluate", "--checkpoint", ckpt, "--out", str(tmp / "eval")],
    "calibrate": lambda ckpt, tmp: ["calibrate", "--checkpoint", ckpt, "--temperature"],
}


def boxes(folder: Path) -> Path:
    (folder / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nchest.png,Mass,1,2,3,4\n")
    return folder / "boxes.csv"


@pytest.mark.parametrize("command", [*COMMANDS, "train --resume"])
def test_every_command_refuses_a_pickle_checkpoint(command: str, forged: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    run, marker = forged
    if command == "train --resume":
        argv = ["train", "--resume", str(run), "--quiet"]
    else:
        argv = COMMANDS[command](str(run / "checkpoints" / "best.pt"), tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "old pickle checkpoint" in err and "--trust-pickle" in err and "cxrdx convert" in err, err
    assert "checkpoints/" in err  # names the file
    assert not marker.exists()
    assert not (tmp_path / "model.onnx").exists()


def test_serve_workers_refuse_a_pickle_checkpoint(forged: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch):
    from cxrdx.serve.app import app_from_env

    run, marker = forged
    monkeypatch.setenv("CXRDX_SERVE_CHECKPOINT", str(run / "checkpoints" / "best.pt"))
    with pytest.raises(CxrdxError, match="--trust-pickle"):
        app_from_env()
    assert not marker.exists()


def test_a_trusted_old_checkpoint_converts_and_predicts_identically(tmp_path: Path, capsys: pytest.CaptureFixture):
    old = save_pickle_checkpoint(tmp_path / "old.pt", every_field())
    new = tmp_path / "new.pt"
    picture = str(image(tmp_path))
    assert main(["convert", str(old), "--out", str(new)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not new.exists()
    with pytest.warns(PickleCheckpointWarning):
        assert main(["convert", str(old), "--out", str(new), "--trust-pickle"]) == 0
    assert f"wrote {new} ({FORMAT})" in capsys.readouterr().out
    with pytest.warns(PickleCheckpointWarning):
        assert main(["predict", "--checkpoint", str(old), picture, "--format", "json", "--trust-pickle"]) == 0
    from_old = json.loads(capsys.readouterr().out)
    assert main(["predict", "--checkpoint", str(new), picture, "--format", "json"]) == 0
    from_new = json.loads(capsys.readouterr().out)
    assert from_new == from_old and from_new[0]["probabilities"]
    converted = load_checkpoint(new)
    assert converted.temperature == every_field().temperature and converted.epoch == 7


def test_calibrate_rewrites_an_old_checkpoint_in_the_safe_format(
    phantom_cache: Path, phantom_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    run = tmp_path / "run"
    old = save_pickle_checkpoint(
        run / "checkpoints" / "best.pt", tiny_checkpoint(config={"data": {"cache": str(phantom_cache), "workers": 0}})
    )
    shutil.copy(phantom_split, run / "split.csv")
    assert main(["calibrate", "--checkpoint", str(old), "--temperature", "--quiet", "--trust-pickle"]) == 0
    assert f"cxrdx calibrate: note: {old}: unpickling an old {PICKLE_FORMAT} checkpoint" in capsys.readouterr().err
    calibrated = load_checkpoint(old)  # no --trust-pickle needed any more
    assert len(calibrated.temperature) == 14 and calibrated.val_metrics["calibration"]["temperature"] is True


def test_damaged_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    path = save_checkpoint(tmp_path / "best.pt", tiny_checkpoint())
    data = path.read_bytes()
    for cut, reason in (
        (len(data) - 100, "damaged checkpoint file"),
        (len(data) // 2, "damaged checkpoint file"),
        (100, "damaged checkpoint file"),
        (3, "not a cxrdx checkpoint"),
        (0, "not a cxrdx checkpoint"),
    ):
        path.write_bytes(data[:cut])
        with pytest.raises(CxrdxError, match=reason) as caught:
            load_checkpoint(path)
        assert str(caught.value).startswith(f"{path}: ")
    assert main(["predict", "--checkpoint", str(path), str(image(tmp_path))]) == 2
    assert f"{path}: not a cxrdx checkpoint" in capsys.readouterr().err


def _with_header(path: Path, metadata: dict[str, str]) -> Path:
    save_file(tiny_checkpoint().state_dict, path, metadata=metadata)
    return path


def _header(**changes) -> str:
    values = {"model_name": "test_resnet", "input_size": 32, "mean": [0.5], "std": [0.25], **changes}
    return json.dumps({k: v for k, v in values.items() if v is not ...})


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"format": FORMAT, "checkpoint": _header(input_size="32")}, "'input_size' must be an integer, not \"32\""),
        ({"format": FORMAT, "checkpoint": _header(input_size=True)}, "'input_size' must be an integer"),
        ({"format": FORMAT, "checkpoint": _header(mean=0.5)}, "'mean' must be a list of numbers"),
        ({"format": FORMAT, "checkpoint": _header(temperature=["1"] * 14)}, "'temperature' must be a list of numbers or null"),
        ({"format": FORMAT, "checkpoint": _header(thresholds=[0.5] * 3)}, "'thresholds' has 3 values for 14 findings"),
        ({"format": FORMAT, "checkpoint": _header(config=[])}, "'config' must be an object"),
        ({"format": FORMAT, "checkpoint": _header(model_name=...)}, "incomplete cxrdx checkpoint \\(no model_name"),
        ({"format": FORMAT, "checkpoint": "[1, 2]"}, "header is not a JSON object"),
        ({"format": FORMAT, "checkpoint": "{not json"}, "header is not valid JSON"),
        ({"format": FORMAT}, "header is not valid JSON"),
        ({"format": "pt"}, "a safetensors file but not a cxrdx checkpoint"),
        ({"format": "cxrdx-checkpoint/3", "checkpoint": _header()}, "expected 'cxrdx-checkpoint/2'"),
    ],
)
def test_a_wrong_header_is_refused_clearly(tmp_path: Path, metadata: dict[str, str], message: str):
    path = _with_header(tmp_path / "best.pt", metadata)
    with pytest.raises(CxrdxError, match=message) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_save_refuses_what_load_would_refuse(tmp_path: Path):
    with pytest.raises(CxrdxError, match="'input_size' must be an integer"):
        save_checkpoint(tmp_path / "best.pt", dataclasses.replace(tiny_checkpoint(), input_size="32"))
    assert not (tmp_path / "best.pt").exists()


def test_the_resume_state_loads_without_unpickling_classes(tmp_path: Path, forged: tuple[Path, Path]):
    from cxrdx.checkpoint import pickle_train_state, save_train_state

    state = {"model": tiny_checkpoint().state_dict, "rng": [{"numpy": ("MT19937", [1, 2], 0, 0, 0.0)}], "best": None}
    path = save_train_state(tmp_path / "train_state.pt", state)
    loaded = load_train_state(path)
    assert loaded["rng"] == state["rng"] and loaded["best"] is None
    best = save_checkpoint(tmp_path / "best.pt", tiny_checkpoint())
    with pytest.raises(CxrdxError, match="not a cxrdx resume state file"):
        load_train_state(best)
    with pytest.raises(CxrdxError, match="holds no resume state"):
        pickle_train_state(best, trust_pickle=True)
    run, marker = forged
    with pytest.raises(CxrdxError, match="not a cxrdx resume state file"):
        load_train_state(run / "checkpoints" / "last.pt")  # weights_only refuses the forged class
    with pytest.raises(CxrdxError, match="--trust-pickle"):
        pickle_train_state(run / "checkpoints" / "last.pt")
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "train_state.pt")
    assert main(["train", "--resume", str(run), "--quiet", "--trust-pickle"]) == 2  # trust covers old last.pt files only
    assert not marker.exists()


def test_an_old_run_resumes_exactly_when_trusted(phantom_cache: Path, tmp_path: Path):
    from cxrdx.engine import train

    def config(out: Path):
        return load_config(
            None,
            [
                f"data.cache={phantom_cache}",
                f"out={out}",
                "data.input_size=32",
                "data.workers=0",
                "model.name=test_resnet",
                "optim.global_batch=32",
                "optim.epochs=2",
                "ema.decay=0.9",
            ],
        )

    new = train(config(tmp_path / "new"), stop_after_epoch=1, progress=False)
    old = tmp_path / "old"
    shutil.copytree(new, old)
    # the run as an older cxrdx left it: the resume state inside a pickle last.pt, numpy's RNG key an array
    state = load_train_state(old / "checkpoints" / "train_state.pt")
    del state["format"]
    for rng in state["rng"]:
        name, keys, *position = rng["numpy"]
        rng["numpy"] = (name, np.asarray(keys, dtype=np.uint32), *position)
    save_pickle_checkpoint(old / "checkpoints" / "last.pt", load_checkpoint(new / "checkpoints" / "last.pt"), train_state=state)
    (old / "checkpoints" / "train_state.pt").unlink()

    assert main(["train", "--resume", str(old), "--quiet"]) == 2
    with pytest.warns(PickleCheckpointWarning):
        assert main(["train", "--resume", str(old), "--quiet", "--trust-pickle"]) == 0
    train(config(new), resume=True, progress=False)
    a, b = (load_train_state(run / "checkpoints" / "train_state.pt") for run in (new, old))
    assert a["epoch"] == b["epoch"] == 2
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"  # bitwise, as an uninterrupted resume
    assert load_checkpoint(old / "checkpoints" / "last.pt").epoch == 2  # the old run now holds format 2 files


@pytest.mark.parametrize("low_byte", [0x80, 0x50])  # 0x80 is pickle's PROTO opcode, 0x50 the "P" of a zip
def test_a_header_length_that_looks_like_a_pickle_still_loads(tmp_path: Path, low_byte: int):
    path = tmp_path / "best.pt"
    for pad in range(256):  # the header length grows with the name: find one whose first byte is low_byte
        save_checkpoint(path, tiny_checkpoint(model_kwargs={"pad": "x" * pad}))
        if path.read_bytes()[0] == low_byte:
            break
    assert path.read_bytes()[0] == low_byte
    assert load_checkpoint(path).model_kwargs["pad"] == "x" * pad
