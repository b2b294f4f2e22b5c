"""`cxrdx import`: torchxrayvision's and CheXNet's weights as cxrdx checkpoints, checked against upstream.

The upstream models are randomly initialised (no test downloads weights); their classifiers are scaled
down so that the probabilities compared are not all 0 or 1.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from fastapi.testclient import TestClient

from cxrdx import evaluation
from cxrdx.checkpoint import load_checkpoint
from cxrdx.cli import main
from cxrdx.errors import CxrdxError
from cxrdx.explain import explain
from cxrdx.export import OnnxPredictor
from cxrdx.findings import FINDINGS
from cxrdx.imported import CHEXNET_LABELS, import_model
from cxrdx.predict import Predictor
from cxrdx.serve import create_app

xrv = pytest.importorskip("torchxrayvision")
skimage_io = pytest.importorskip("skimage.io")
pytestmark = pytest.mark.slow


def xrv_densenet(path: Path) -> torch.nn.Module:
    """A random torchxrayvision DenseNet saved as its releases are: the whole pickled module."""
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    model.classifier.weight.data.mul_(0.01)
    torch.save(model, path)
    return model


def xrv_resnet(path: Path) -> torch.nn.Module:
    """A random ResNet-50 of torchxrayvision's resnet50-res512-all, saved as its release is: a state dict."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=18, weights=None)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.fc.weight.data.mul_(1e-4)
    torch.save(model.state_dict(), path)
    return model.eval()


def xrv_pipeline(model: torch.nn.Module, files: list[Path], size: int) -> np.ndarray:
    """torchxrayvision's own steps: normalize, XRayCenterCrop, XRayResizer, forward; sigmoid of its outputs."""
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(size)
    out = []
    for path in files:
        image = resize(crop(xrv.datasets.normalize(skimage_io.imread(path), 255)[None]))
        with torch.inference_mode():
            out.append(torch.sigmoid(model(torch.from_numpy(image)[None]))[0].numpy())
    return np.array(out, dtype=np.float64)


def grey_images(nih_sample: Path, n: int) -> list[Path]:
    """The first n single-channel PNGs (cxrdx and torchxrayvision reduce RGBA to grey differently)."""
    paths = sorted((nih_sample / "images").glob("*.png"))
    return [p for p in paths if skimage_io.imread(p).ndim == 2][:n]


def cli_predict(checkpoint: Path, files: list[Path], out: Path) -> pd.DataFrame:
    assert main(["predict", "--checkpoint", str(checkpoint), *map(str, files), "--format", "csv", "--out", str(out)]) == 0
    return pd.read_csv(out)


@pytest.mark.parametrize(
    ("tag", "save", "size", "n"),
    [
        ("densenet121-res224-nih", xrv_densenet, 224, 8),
        ("resnet50-res512-all", xrv_resnet, 512, 3),
    ],
)
def test_cxrdx_predict_equals_torchxrayvision_on_real_xrays(tmp_path, nih_sample, tag, save, size, n) -> None:
    upstream = save(tmp_path / "upstream.pt")
    checkpoint = tmp_path / "imported.pt"
    assert main(["import", f"xrv:{tag}", "--weights", str(tmp_path / "upstream.pt"), "--out", str(checkpoint)]) == 0
    files = grey_images(nih_sample, n)
    ours = cli_predict(checkpoint, files, tmp_path / "p.csv")
    labels = xrv.models.model_urls[tag]["labels"]
    expected = xrv_pipeline(upstream, files, size)[:, [labels.index(f) for f in FINDINGS]]
    got = ours[list(FINDINGS)].to_numpy()
    assert 0.05 < got.mean() < 0.95 and got.std() > 1e-3  # informative, not saturated
    assert np.abs(got - expected).max() <= 1e-5
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.findings == list(FINDINGS) and ckpt.preprocess == "xrv" and ckpt.input_size == size
    thresholds = xrv.models.model_urls[tag]["op_threshs"]
    assert ckpt.thresholds == pytest.approx([thresholds[labels.index(f)] for f in FINDINGS])
    assert ckpt.provenance["source"] == f"xrv:{tag}" and len(ckpt.provenance["sha256"]) == 64
    assert ckpt.provenance["hash_verified"] is False and ckpt.provenance["url"].endswith(".pt")


def test_positives_are_torchxrayvision_operating_points_through_its_own_loader(tmp_path, nih_sample, monkeypatch) -> None:
    """The file sits where torchxrayvision's loader looks for it: it loads there (op_threshs applied) and
    `import` without --weights takes it through `xrv.models.get_weights`."""
    tag = "densenet121-res224-chex"
    cache = tmp_path / "xrv-cache"
    cache.mkdir()
    xrv_densenet(cache / Path(xrv.models.model_urls[tag]["weights_url"]).name)
    theirs = xrv.models.DenseNet(weights=tag, cache_dir=str(cache))  # torchxrayvision's real loading path
    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(cache))
    result = import_model(f"xrv:{tag}")
    assert result.missing == ["Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening"]
    predictor = Predictor(result.checkpoint, device="cpu")
    files = grey_images(nih_sample, 4)
    normalised = xrv_pipeline(theirs, files, 224)  # sigmoid of op_norm's output: > sigmoid(0.5) when positive
    positive = normalised >= 1 / (1 + np.exp(-0.5))
    for prediction, row in zip(predictor.predict(files), positive):
        assert prediction.positives == [f for f in predictor.findings if row[theirs.pathologies.index(f)]]
        assert list(prediction.probabilities) == predictor.findings  # the others are n/a: absent


def test_evaluate_and_export_see_what_predict_sees(tmp_path, nih_sample) -> None:
    xrv_densenet(tmp_path / "upstream.pt")
    checkpoint, onnx = tmp_path / "nih.pt", tmp_path / "nih.onnx"
    assert main(["import", "xrv:densenet121-res224-nih", "--weights", str(tmp_path / "upstream.pt"), "--out", str(checkpoint)]) == 0
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    files = grey_images(nih_sample, 4)
    for path in files:
        (data / "images" / path.name).symlink_to(path)
    table = pd.read_csv(nih_sample / "Data_Entry_2017_v2020.csv")
    table[table["Image Index"].isin([p.name for p in files])].to_csv(data / "Data_Entry_2017_v2020.csv", index=False)
    split = evaluation.predict_split(checkpoint, split="all", data_dir=data, device="cpu", progress=False).predictions
    expected = Predictor.from_checkpoint(checkpoint, device="cpu").predict_proba([data / "images" / n for n in split.names])
    assert np.abs(split.probs - expected).max() <= 1e-6
    with pytest.raises(CxrdxError, match="--data-dir"):
        evaluation.predict_split(checkpoint, split="all", cache=tmp_path)
    assert main(["export", "--checkpoint", str(checkpoint), "--onnx", str(onnx)]) == 0
    exported = OnnxPredictor.from_file(onnx)
    assert exported.info.preprocess == "xrv"
    assert np.abs(exported.predict_proba(files) - Predictor.from_checkpoint(checkpoint, device="cpu").predict_proba(files)).max() <= 1e-5
    chex = tmp_path / "chex.pt"
    assert main(["import", "xrv:densenet121-res224-chex", "--weights", str(tmp_path / "upstream.pt"), "--out", str(chex)]) == 0
    with pytest.raises(CxrdxError, match="does not predict Emphysema"):
        evaluation.predict_split(chex, split="all", data_dir=data, device="cpu", progress=False)


def chexnet_file(path: Path) -> torch.nn.Module:
    """A CheXNet reproduction's checkpoint: DataParallel around a module holding torchvision's densenet121
    with a Linear + Sigmoid classifier, old-style layer names, under 'state_dict' with training state."""
    torch.manual_seed(0)
    net = torchvision.models.densenet121(weights=None)
    net.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    net.classifier[0].weight.data.mul_(0.01)
    wrapper = torch.nn.Module()
    wrapper.densenet121 = net
    state = OrderedDict(
        (("module." + k).replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."), v) for k, v in wrapper.state_dict().items()
    )
    torch.save({"epoch": 3, "best_loss": 0.15, "state_dict": state}, path)
    return net.eval()


def test_chexnet_layout_imports_and_keeps_its_outputs(tmp_path) -> None:
    upstream = chexnet_file(tmp_path / "m-25012018-123527.pth.tar")
    result = import_model("chexnet", tmp_path / "m-25012018-123527.pth.tar")
    ckpt = result.checkpoint
    assert result.missing == [] and ckpt.findings == list(FINDINGS) and ckpt.model_kwargs == {"in_chans": 3}
    assert ckpt.preprocess == "cxrdx" and ckpt.mean == pytest.approx([0.485, 0.456, 0.406])
    predictor = Predictor(ckpt, device="cpu")
    pixels = predictor.load(np.random.default_rng(0).integers(0, 256, (300, 260), dtype=np.uint8))
    x = predictor.to_tensor(pixels[None])
    assert x.shape == (1, 3, 224, 224)
    with torch.inference_mode():
        theirs = upstream(x)[0].numpy()[[CHEXNET_LABELS.index(f) for f in FINDINGS]]
    assert np.abs(predictor.predict_proba(pixels[None])[0] - theirs).max() <= 1e-6


def test_group_cam_and_the_service_work_on_imported_models(tmp_path, nih_sample) -> None:
    xrv_densenet(tmp_path / "xrv.pt")
    chexnet_file(tmp_path / "chexnet.pth")
    data = grey_images(nih_sample, 1)[0].read_bytes()
    for source, weights in (("xrv:densenet121-res224-nih", "xrv.pt"), ("chexnet", "chexnet.pth")):
        predictor = Predictor(import_model(source, tmp_path / weights).checkpoint, device="cpu")
        x = predictor.to_tensor(predictor.load(data)[None])
        with torch.enable_grad():
            heat = explain(predictor.model, x, FINDINGS.index("Cardiomegaly"), method="groupcam")
        assert heat.shape == (224, 224) and heat.min() == 0 and heat.max() == 1
        with TestClient(create_app(predictor), base_url="http://localhost") as client:
            body = client.post("/v1/predict", params={"image": "true"}, files={"file": ("x.png", data)}).json()
            assert np.allclose(list(body["probabilities"].values()), predictor.predict_proba(data)[0], atol=1e-6)
            assert body["image"].startswith("data:image/png;base64,")  # the model view un-normalised by mean and std


class Payload:
    """Any class outside a model's modules: unpickling it could run code."""


def test_a_file_with_other_objects_is_refused_unless_trusted(tmp_path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(CxrdxError, match="--trust-pickle"):
        import_model("chexnet", path)
    assert main(["import", "xrv:densenet121-res224-nih", "--weights", str(path), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(CxrdxError, match="unknown model source"):
        import_model("xrv:densenet121-res999", path)
