"""Training config: the paper's defaults, the six presets, `--set` overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrdx.cli import main
from cxrdx.config import TrainConfig, load_config, save_config
from cxrdx.errors import CxrdxError

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "resnet50_wbce": ("resnet50", "wbce", 150),
    "resnet50_ours": ("resnet50", "ours", 150),
    "efficientnet_b5_wbce": ("efficientnet_b5", "wbce", 130),
    "efficientnet_b5_ours": ("efficientnet_b5", "ours", 130),
    "coatnet0_wbce": ("coatnet_0_rw_224", "wbce", 150),
    "coatnet0_ours": ("coatnet_0_rw_224", "ours", 150),
}


def test_defaults_are_the_paper_recipe():
    config = TrainConfig()
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adam", 5e-5, 0.01)
    assert (config.optim.batch_size, config.optim.epochs, config.optim.pct_start) == (150, 100, 0.2)
    assert (config.ema.enabled, config.ema.decay) == (True, 0.9997)
    assert (config.model.drop_rate, config.selection.monitor, config.data.input_size) == (0.5, "val_loss", 224)
    assert config.data.split_file is None and config.runtime.amp == "auto"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_presets(name):
    path = REPO / "configs" / "paper" / f"{name}.yaml"
    config = load_config(path)
    model, loss, batch = PRESETS[name]
    assert (config.name, config.model.name, config.loss.name, config.optim.batch_size) == (name, model, loss, batch)
    assert config.model.pretrained == "imagenet" and config.data.split_file is None
    assert config.optim.lr == 5e-5 and config.optim.epochs == 100 and config.ema.decay == 0.9997
    text = path.read_text()
    assert "data.split_file=../shared/data/chestxray14/paper_split.csv.gz" in text and "244" in text


def test_overrides_are_parsed_and_typed():
    config = load_config(
        REPO / "configs" / "paper" / "coatnet0_ours.yaml",
        ["optim.lr=1e-3", "optim.epochs=3", "data.mean=[0.5]", "data.std=[0.25]", "optim.grad_clip=1",
         "loss.hyper.gamma_neg=2", "selection.patience=null", "data.split_file=x.csv", "runtime.amp=off"],
    )
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)
    assert config.optim.epochs == 3 and config.optim.grad_clip == 1.0 and isinstance(config.optim.grad_clip, float)
    assert config.data.mean == [0.5] and config.loss.hyper == {"gamma_neg": 2}
    assert config.data.split_file == "x.csv" and config.runtime.amp == "off"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "valid keys in optim: name, lr, weight_decay"),
        ("nosuch=1", "valid keys: name, out, seed, data, model"),
        ("optim.epochs=many", "optim.epochs: expected int, got 'many'"),
        ("optim.epochs=2.5", "optim.epochs: expected int"),
        ("ema.enabled=3", "ema.enabled: expected bool"),
        ("runtime.amp=fp8", "runtime.amp: 'fp8' is not one of auto, off, bf16, fp16"),
        ("selection.monitor=acc", "is not one of val_loss, mean_auroc"),
        ("optim=3", "optim: expected a mapping"),
        ("optim.lr.x=1", "optim.lr: expected float"),
        ("novalue", "expected key.sub=value"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(CxrdxError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(CxrdxError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n  bogus: 2\n")
    with pytest.raises(CxrdxError, match=r"bad.yaml: unknown config key 'optim.bogus'"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(CxrdxError, match="mapping at the top level"):
        load_config(bad)


def test_save_and_load_round_trip(tmp_path):
    config = load_config(None, ["model.name=resnet18", "data.mean=[0.4]", "model.kwargs={drop_path_rate: 0.1}"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_cli_reports_a_bad_override_without_traceback(capsys):
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "cxrdx train: error: unknown config key 'optim.lrr'" in err and "Traceback" not in err
