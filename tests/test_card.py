"""Model cards: written by training on the phantom cache, enriched by evaluate, served, embedded in the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import make_checkpoint, tiny_config

from cxrdx import card, rundir
from cxrdx.checkpoint import load_checkpoint
from cxrdx.cli import main

MITCHELL = [
    "Model details",
    "Intended use",
    "Factors",
    "Metrics",
    "Evaluation data",
    "Training data",
    "Quantitative analyses",
    "Ethical considerations",
    "Caveats and recommendations",
]
MONAI_KEYS = [
    "name",
    "version",
    "description",
    "authors",
    "intended_use",
    "data_source",
    "data_type",
    "image_classes",
    "label_classes",
    "pred_classes",
    "references",
    "task",
    "network_data_format",
]
PHANTOMS = "trained on synthetic phantoms, not on radiographs of patients"
NO_EXTERNAL = "no external validation (no evaluation on images from another hospital or dataset)"


@pytest.fixture(scope="module")
def run(phantom_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of test_resnet on the phantoms, then `cxrdx evaluate` of its best.pt into RUN/eval."""
    from cxrdx.engine import train

    torch.set_num_threads(1)
    run_dir = train(tiny_config(phantom_cache, tmp_path_factory.mktemp("card") / "run", "optim.epochs=1"), progress=False)
    assert (run_dir / "card.json").is_file() and not (run_dir / "eval").exists()  # the first card, before any evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(
                [
                    "evaluate",
                    "--checkpoint",
                    str(rundir.best_checkpoint(run_dir)),
                    "--out",
                    str(run_dir / "eval"),
                    "--quiet",
                    "--workers",
                    "0",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    return run_dir


def test_the_run_card_has_every_section_and_the_phantom_warning(run: Path, phantom_cache: Path):
    text = (run / "card.md").read_text(encoding="utf-8")
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert [h for h in headings if h in MITCHELL] == MITCHELL
    assert {"Preprocessing", "Provenance"} <= set(headings)
    assert f"> **NOT FOR CLINICAL USE**: {PHANTOMS}; {NO_EXTERNAL}." in text
    assert "Input guard**: on: Mahalanobis distance" in text  # cxrdx train fits it

    values = json.loads((run / "card.json").read_text(encoding="utf-8"))
    assert values["format"] == card.FORMAT and values["not_for_clinical_use"] == [PHANTOMS, NO_EXTERNAL]
    training = values["training_data"]
    assert training["synthetic"] is True and training["source"].startswith("cxrdx phantoms: synthetic radiographs (240 images, seed 0)")
    assert training["leakage"] == {"val_images_with_train_patient": 0, "test_images_with_train_patient": 0}  # the patient split
    assert sum(s["images"] for s in training["splits"].values()) == 240
    assert values["guard"].startswith("on: Mahalanobis") and values["provenance"]["imported"] is None
    # the phantoms' marker travels: generator folder -> cache meta.json -> checkpoint config
    marker = json.loads((phantom_cache / "meta.json").read_text())["data_source"]
    assert marker["synthetic"] is True and load_checkpoint(rundir.best_checkpoint(run)).config["data_source"] == marker
    assert values["provenance"]["sha256"] == card._sha256(rundir.best_checkpoint(run))


def test_evaluate_enriches_the_run_card(run: Path):
    result = rundir.read_eval_metrics(run / "eval")
    (evaluation,) = json.loads((run / "card.json").read_text())["evaluations"]
    assert evaluation["kind"] == "internal" and evaluation["split"] == "test" and evaluation["images"] == result.overall["images"]
    assert evaluation["auroc"] == pytest.approx(result.overall["auroc"]["mean"])
    assert evaluation["auroc_low"] == pytest.approx(result.overall["auroc"]["low"])
    assert [s["finding"] for s in evaluation["per_finding"]] == list(result.per_finding)
    assert f"{result.overall['auroc']['mean']:.3f} ({result.overall['auroc']['low']:.3f}–" in (run / "card.md").read_text()
    assert card.run_evaluations(run) == [run / "eval"]  # evaluating again would not list it twice


def test_json_has_the_monai_bundle_keys_and_reads_back(run: Path):
    values = json.loads((run / "card.json").read_text())
    monai = values["monai_metadata"]
    assert all(key in monai for key in MONAI_KEYS)
    image, pred = monai["network_data_format"]["inputs"]["image"], monai["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 1 and image["spatial_shape"] == [32, 32]
    (mean,), (std,) = values["preprocessing"]["mean"], values["preprocessing"]["std"]
    assert image["value_range"] == pytest.approx([-mean / std, (1 - mean) / std], abs=1e-4)  # the normalised network input
    assert pred["num_channels"] == 14 and pred["channel_def"]["0"] == "Atelectasis"
    assert "Not for clinical use" in monai["intended_use"]
    assert card.card_json(card.read_run_card(run)) == values  # one reader, one writer: the JSON round-trips


def test_only_an_external_evaluation_lifts_the_second_reason(run: Path, tmp_path: Path):
    internal = rundir.read_eval_metrics(run / "eval")
    external = rundir.EvalMetrics.from_dict(
        {**internal.to_dict(), "settings": {**internal.settings, "split": "all", "data": str(tmp_path)}}
    )
    same_cache = rundir.EvalMetrics.from_dict({**internal.to_dict(), "settings": {**internal.settings, "split": "all"}})
    best = rundir.best_checkpoint(run)
    assert card.build_card(best, [same_cache]).not_for_clinical_use == [PHANTOMS, NO_EXTERNAL]  # all images of the training cache
    phantom = card.build_card(best, [internal, external])
    assert [e.kind for e in phantom.evaluations] == ["internal", "external"] and phantom.not_for_clinical_use == [PHANTOMS]
    real = card.build_card(make_checkpoint(tmp_path / "real.pt"), [external])  # no phantom marker: real data
    assert real.not_for_clinical_use == [] and real.training_data.licence == card.NIH_LICENCE
    assert "NOT FOR CLINICAL USE" not in card.card_markdown(real)


def test_guard_and_import_provenance_are_read_when_present(tmp_path: Path):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "imported.pt"))
    ckpt.guard = {"kind": "ood", "threshold": 0.9}
    ckpt.provenance = {"source": "torchxrayvision", "tag": "densenet121-res224-nih", "sha256": "ab12"}
    model_card = card.build_card(ckpt)
    assert model_card.guard == "on: kind ood, threshold 0.9"
    assert model_card.provenance.imported == ckpt.provenance and model_card.provenance.sha256 is None
    assert model_card.model_details.developed_with == "imported into cxrdx"
    assert "torchxrayvision" in model_card.training_data.source and model_card.training_data.leakage is None


def test_cli_writes_markdown_and_json(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cards" / "model.md"
    assert main(["card", "--checkpoint", str(rundir.best_checkpoint(run)), "--out", str(out)]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["evaluations"][0]["folder"] == str(run / "eval")
    assert f"not for clinical use: {PHANTOMS}" in capsys.readouterr().out
    assert main(["card", "--checkpoint", str(rundir.best_checkpoint(run)), "--eval", str(tmp_path), "--out", str(out)]) == 2
    assert f"{tmp_path}: not an evaluation folder (no metrics.json)" in capsys.readouterr().err


def test_the_report_embeds_the_card(run: Path, tmp_path: Path):
    from cxrdx.report import write_report

    html = write_report([run], tmp_path / "report", progress=False).read_text(encoding="utf-8")
    section = html[html.index("<section id='model-card'>") :]
    section = section[: section.index("</section>")]
    assert f"<p class='not-clinical'>Not for clinical use: {PHANTOMS}; {NO_EXTERNAL}.</p>" in section
    assert all(f"<h4>{title}</h4>" in section for title in MITCHELL)
    assert "<a href='#model-card'>Model card</a>" in html


def test_model_endpoint_serves_the_card(run: Path):
    from fastapi.testclient import TestClient

    from cxrdx.predict import Predictor
    from cxrdx.serve import create_app

    predictor = Predictor.from_checkpoint(rundir.best_checkpoint(run), device="cpu")
    with TestClient(create_app(predictor), base_url="http://localhost") as client:
        served = client.get("/v1/model").json()["card"]
    assert served["format"] == card.FORMAT and served["not_for_clinical_use"] == [PHANTOMS, NO_EXTERNAL]
    assert served["intended_use"]["primary"].startswith("Research on") and served["monai_metadata"]["name"] == "run"
