"""Training config: the paper's defaults, the six presets, `--set` overrides and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrdx.cli import main
from cxrdx.config import TrainConfig, load_config, preset_names, save_config
from cxrdx.errors import CxrdxError

PRESET_DIR = Path(__file__).resolve().parents[1] / "src" / "cxrdx" / "presets"

PRESETS = {
    "resnet50_wbce": ("resnet50", "wbce", 150, "torchvision", "new"),
    "resnet50_ours": ("resnet50", "ours", 150, "torchvision", "new"),
    "efficientnet_b5_wbce": ("efficientnet_b5", "wbce", 130, "torchvision", "new"),
    "efficientnet_b5_ours": ("efficientnet_b5", "ours", 130, "torchvision", "new"),
    "coatnet0_wbce": ("coatnet_0_rw_224", "wbce", 150, "imagenet", "summed"),
    "coatnet0_ours": ("coatnet_0_rw_224", "ours", 150, "imagenet", "summed"),
}


def test_defaults_are_the_released_hyper_parameters_without_weights():
    config = TrainConfig()
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay) == ("adam", 5e-5, 0.01)
    assert (config.optim.global_batch, config.optim.batch_per_process, config.optim.epochs, config.optim.pct_start) == (600, None, 100, 0.2)
    assert (config.ema.enabled, config.ema.decay) == (True, 0.9997)
    assert (config.model.drop_rate, config.selection.monitor, config.data.input_size) == (0.5, "val_loss", 224)
    assert config.data.split_file is None and config.runtime.amp == "auto" and config.model.pretrained == "none"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_presets_are_the_released_code_on_its_4_gpus(name):
    from cxrdx.engine import plan_run
    from cxrdx.models import TORCHVISION_KWARGS

    config = load_config(f"paper/{name}")
    model, loss, per_gpu, weights, first_conv = PRESETS[name]
    assert (config.name, config.model.name, config.loss.name) == (name, model, loss)
    assert (config.model.pretrained, config.model.first_conv, config.selection.weights) == (weights, first_conv, "raw")
    assert (config.optim.global_batch, config.loss.sum_over_images) == (4 * per_gpu, per_gpu)
    assert config.data.mean == [0.49765033] and config.data.std == [0.22956071] and config.data.random_erasing == 0.5
    assert config.data.augment_before_resize and config.data.input_size == 224 and config.data.split_file is None
    assert config.optim.lr == 5e-5 and config.optim.epochs == 100 and config.ema.decay == 0.9997
    assert config.model.kwargs == (TORCHVISION_KWARGS.get(model, {}) if weights == "torchvision" else {})
    plan = plan_run(config, 4, 78_484)  # the paper's training split on its 4 GPUs
    assert plan.per_process == (per_gpu,) * 4 and plan.steps_per_epoch == 78_484 // (4 * per_gpu)
    assert plan_run(config, 1, 78_484).steps_per_epoch == plan.steps_per_epoch  # the same steps on one GPU
    text = (PRESET_DIR / "paper" / f"{name}.yaml").read_text()
    assert "--set data.split_file=PATH" in text and "244" in text and "../shared" not in text


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_recommended_presets_differ_only_where_the_readme_says(name):
    paper, recommended = load_config(f"paper/{name}").to_dict(), load_config(f"recommended/{name}.yaml").to_dict()
    changed = {
        (section, key)
        for section, values in paper.items()
        if isinstance(values, dict)
        for key in values
        if values[key] != recommended[section][key]
    }
    expected = {
        ("data", "cache"),
        ("data", "workers"),
        ("data", "mean"),
        ("data", "std"),
        ("data", "augment_before_resize"),
        ("selection", "weights"),
    }
    if PRESETS[name][4] == "new":
        expected.add(("model", "first_conv"))
    assert changed == expected
    assert recommended["out"] == paper["out"] + "_recommended"


def test_presets_by_name_from_any_folder_and_by_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert "paper/resnet50_ours" in preset_names() and "recommended/coatnet0_wbce" in preset_names() and "demo" in preset_names()
    assert load_config("paper/resnet50_ours").name == load_config(PRESET_DIR / "paper" / "resnet50_ours.yaml").name
    with pytest.raises(CxrdxError, match="paper/resnet5_ours: config file not found, and not a built-in preset"):
        load_config("paper/resnet5_ours")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    assert all(name in listed for name in preset_names()) and "model.pretrained=none" in listed


def test_batch_keys(tmp_path):
    from cxrdx.engine import plan_run, spread

    assert spread(130, 4) == (33, 33, 32, 32) and spread(600, 4) == (150,) * 4 and spread(7, 7) == (1,) * 7
    config = load_config(None, ["optim.global_batch=null", "optim.batch_per_process=150"])
    plan = plan_run(config, 4, 78_484)
    assert (plan.global_batch, plan.steps_per_epoch, plan.total_steps) == (600, 130, 13_000)
    assert plan.ema_horizon_epochs == pytest.approx(3333.33 / 130, rel=1e-4) and not plan.warnings
    with pytest.raises(
        CxrdxError, match="set exactly one .both are set.; e.g. --set optim.batch_per_process=150 --set optim.global_batch=null"
    ):
        load_config(None, ["optim.batch_per_process=150"])
    with pytest.raises(CxrdxError, match="optim.batch_size was ambiguous and is replaced: use optim.global_batch"):
        load_config(None, ["optim.batch_size=150"])
    with pytest.raises(CxrdxError, match="smaller than the 4 processes"):
        plan_run(load_config(None, ["optim.global_batch=3"]), 4, 100)
    with pytest.raises(CxrdxError, match="selection.weights=ema needs ema.enabled=true"):
        load_config(None, ["ema.enabled=false"])


def test_overrides_are_parsed_and_typed():
    config = load_config(
        "paper/coatnet0_ours",
        [
            "optim.lr=1e-3",
            "optim.epochs=3",
            "data.mean=[0.5]",
            "data.std=[0.25]",
            "optim.grad_clip=1",
            "loss.hyper.gamma_neg=2",
            "selection.patience=null",
            "data.split_file=x.csv",
            "runtime.amp=off",
        ],
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


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("model.name=resnet5O", ("model.name: unknown model 'resnet5O'", "did you mean resnet50")),
        ("loss.name=wce", ("loss.name: unknown loss 'wce'", "did you mean wbce")),
    ],
)
def test_model_and_loss_names_are_checked_when_the_config_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture, override: str, needles: tuple[str, ...]
) -> None:
    with pytest.raises(CxrdxError) as info:
        load_config("demo", [override])
    assert all(needle in str(info.value) for needle in needles)
    assert main(["train", "--config", "demo", "--set", override, "--set", f"out={tmp_path / 'run'}"]) == 2
    assert needles[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder, its config.yaml and split.csv
    assert load_config("demo", ["model.name=resnet18.a1_in1k"]).model.name == "resnet18.a1_in1k"  # a pretrained tag is a known network
