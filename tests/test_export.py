"""ONNX export: checked against PyTorch, self-describing file, OnnxPredictor with Predictor's interface."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from helpers import SIZE, chest_like, dicom_bytes, make_checkpoint
from PIL import Image

from cxrdx.cli import main
from cxrdx.errors import CxrdxError
from cxrdx.export import OnnxPredictor, export_onnx
from cxrdx.findings import FINDINGS
from cxrdx.models import PAPER_MODELS
from cxrdx.predict import Predictor
from cxrdx.serve import create_app

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(
        folder / "best.pt",
        temperature=[1.5] * len(FINDINGS),
        thresholds=[0.4] * len(FINDINGS),
        val_metrics={"auc": np.float64(0.75), "per_finding": np.array([0.5, 0.6])},
    )
    result = export_onnx(ckpt, folder / "model.onnx")
    assert result.max_abs_diff <= TOLERANCE and result.batch == 3
    return ckpt, result.path


def images() -> list[np.ndarray]:
    return [chest_like(90, seed=s) for s in range(5)]


def test_onnx_predictor_matches_pytorch(exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    torch_predictor, onnx_predictor = Predictor.from_checkpoint(ckpt, device="cpu"), OnnxPredictor.from_file(path)
    onnx_info, torch_info = onnx_predictor.info.to_dict(), torch_predictor.info.to_dict()
    assert onnx_info.pop("val_metrics") == {"auc": 0.75, "per_finding": [0.5, 0.6]}  # numpy values as JSON
    torch_info.pop("val_metrics")
    assert onnx_info == torch_info  # findings, thresholds, sizes, mean/std, temperature, version
    expected, got = torch_predictor.predict_proba(images()), onnx_predictor.predict_proba(images())
    assert got.shape == (5, len(FINDINGS))  # a batch of 5 through the dynamic batch axis
    assert np.abs(got - expected).max() <= TOLERANCE
    [prediction] = onnx_predictor.predict([images()[0]], names=["a"])
    assert prediction.thresholds == dict.fromkeys(FINDINGS, 0.4)
    assert prediction.positives == [f for f in FINDINGS if prediction.probabilities[f] >= 0.4]


def test_metadata_makes_the_file_self_sufficient(exported: tuple[Path, Path]) -> None:
    _, path = exported
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == {"cxrdx"}
    for key in ('"findings"', '"thresholds"', '"input_size"', '"mean"', '"std"', '"cache_size"', '"cxrdx-onnx/1"'):
        assert key in meta["cxrdx"]
    assert model.opset_import[0].version == 17


def test_static_batch_export_predicts_one_at_a_time(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, dynamic = exported
    result = export_onnx(ckpt, tmp_path / "static.onnx", dynamic_batch=False)
    static = OnnxPredictor.from_file(result.path)
    assert static.session.get_inputs()[0].shape[0] == 1 and static.batch_size == 1
    assert np.abs(static.predict_proba(images()) - OnnxPredictor.from_file(dynamic).predict_proba(images())).max() <= 1e-6


def test_disagreement_is_an_error_and_writes_nothing(exported: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = exported
    with pytest.raises(CxrdxError, match="disagrees with PyTorch"):
        export_onnx(ckpt, tmp_path / "bad.onnx", tolerance=-1.0)
    assert not (tmp_path / "bad.onnx").exists()


def test_unusable_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(CxrdxError, match="not found"):
        OnnxPredictor.from_file(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(CxrdxError, match="not a readable ONNX model"):
        OnnxPredictor.from_file(tmp_path / "junk.onnx")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(CxrdxError, match="not exported by cxrdx"):
        OnnxPredictor.from_file(tmp_path / "other.onnx")


def test_cli_export_and_predict_with_onnx(exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, _ = exported
    out = tmp_path / "cli.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--onnx", str(out), "--no-dynamic-batch"]) == 0
    assert "max abs probability difference" in capsys.readouterr().out and out.is_file()
    image = tmp_path / "a.dcm"
    image.write_bytes(dicom_bytes(chest_like(70).astype(np.uint16) * 257))
    assert main(["predict", "--onnx", str(out), str(image), "--format", "json"]) == 0
    assert '"name": "a.dcm"' in capsys.readouterr().out


def test_service_on_onnx_runtime(exported: tuple[Path, Path]) -> None:
    ckpt, path = exported
    buffer = io.BytesIO()
    Image.fromarray(images()[0]).save(buffer, format="PNG")
    data = buffer.getvalue()
    with TestClient(create_app(OnnxPredictor.from_file(path)), base_url="http://localhost") as client:
        body = client.post("/v1/predict", files={"file": ("a.png", data)}).json()
        assert body["backend"] == "onnxruntime"
        expected = Predictor.from_checkpoint(ckpt, device="cpu").predict_proba(data)[0]
        assert np.abs(np.array(list(body["probabilities"].values())) - expected).max() <= TOLERANCE
        heatmap = client.post("/v1/explain", params={"finding": "Mass"}, files={"file": ("a.png", data)})
        assert heatmap.status_code == 501 and "--checkpoint" in heatmap.json()["detail"]
        assert client.get("/v1/model").json()["explain"] == {"available": False, "methods": []}


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_backbones_export_within_tolerance(name: str, tmp_path: Path) -> None:
    kwargs = {"img_size": SIZE} if name.startswith("coatnet") else {}
    ckpt = make_checkpoint(tmp_path / "best.pt", model_name=name, model_kwargs=kwargs)
    result = export_onnx(ckpt, tmp_path / f"{name}.onnx")
    print(f"{name}: max abs probability difference ONNX Runtime vs PyTorch {result.max_abs_diff:.2e}")
    assert result.max_abs_diff <= TOLERANCE
    images = [chest_like(80, seed=s) for s in range(4)]
    onnx_probs = OnnxPredictor.from_file(result.path).predict_proba(images)
    torch_probs = Predictor.from_checkpoint(ckpt, device="cpu").predict_proba(images)
    assert np.abs(onnx_probs - torch_probs).max() <= TOLERANCE
