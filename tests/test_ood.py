"""The input guard's content check (cxrdx.ood): fit, score, threshold, storage, prediction, service."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import SIZE, chest_like, foreign_images, make_checkpoint
from PIL import Image

from cxrdx import ood
from cxrdx.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cxrdx.cli import main
from cxrdx.data.cache import open_cache
from cxrdx.data.dataset import rows_for_split
from cxrdx.data.splits import read_split
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS
from cxrdx.models import create_model
from cxrdx.predict import Predictor, format_predictions
from cxrdx.serve import create_app


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.2, 3.0, dim)  # anisotropic: Mahalanobis differs from Euclidean
    return rng.normal(shift, 1.0, (n, dim)) * scales


# --- fit, score, threshold --------------------------------------------------------------------------------


def test_fit_keeps_the_percentile_of_validation_and_scores_shifted_features_higher() -> None:
    guard = ood.fit_guard(gaussian(2000, 16, 0), gaussian(1000, 16, 1))
    assert guard.percentile == 99.0 and guard.val_acceptance == pytest.approx(0.99, abs=0.001)
    assert guard.train_images == 2000 and guard.val_images == 1000
    held_out = ood.score(guard, gaussian(1000, 16, 2))
    assert 0.97 <= np.mean(held_out <= guard.threshold) <= 1.0
    # a shift of 2 along the narrowest axis (10 SD) is refused, the same shift along the widest (0.7 SD) is not
    narrow, wide = gaussian(200, 16, 3), gaussian(200, 16, 3)
    narrow[:, 0] += 2.0
    wide[:, -1] += 2.0
    assert np.mean(ood.score(guard, narrow) > guard.threshold) > 0.95
    assert np.mean(ood.score(guard, wide) > guard.threshold) < 0.1
    # squared Mahalanobis distances of a Gaussian: mean close to the dimension
    assert np.mean(held_out**2) == pytest.approx(16, rel=0.1)


def test_wide_features_are_projected_on_their_leading_components() -> None:
    train, val = gaussian(300, 40, 0), gaussian(100, 40, 1)
    guard = ood.fit_guard(train, val, max_dim=10)
    assert guard.projection.shape == (40, 10) and guard.precision.shape == (10, 10)
    assert np.allclose(guard.projection.T @ guard.projection, np.eye(10), atol=1e-10)
    assert guard.header()["features"] == 40 and guard.header()["components"] == 10
    with pytest.raises(ValueError, match="at least 2"):
        ood.fit_guard(train[:1], val)


def test_threshold_and_refusal() -> None:
    threshold, kept = ood.choose_threshold(np.arange(1, 101, dtype=float), 99.0)
    assert threshold == pytest.approx(99.01) and kept == 0.99
    guard = ood.fit_guard(gaussian(100, 4, 0), gaussian(50, 4, 1))
    assert ood.refusal(guard, guard.threshold) is None
    reason = ood.refusal(guard, guard.threshold + 1)
    assert reason is not None and "out-of-distribution score" in reason and f"{guard.threshold:.4g}" in reason


def test_features_come_from_the_same_pass_as_the_logits() -> None:
    torch.manual_seed(0)
    model = create_model("test_resnet").eval()
    batch = torch.randn(3, 1, SIZE, SIZE)
    with torch.no_grad():
        logits, features = ood.logits_and_features(model, batch)
        assert torch.equal(logits, model(batch))
    assert features.shape == (3, model.num_features)
    assert ood.supports_guard(model) and not ood.supports_guard(torch.nn.Linear(2, 2))


# --- the checkpoint ---------------------------------------------------------------------------------------


def test_checkpoint_stores_the_guard_apart_from_the_weights(tmp_path: Path) -> None:
    plain = load_checkpoint(make_checkpoint(tmp_path / "plain.pt"))
    assert plain.guard is None  # a checkpoint without a guard loads, guard off
    dim = create_model("test_resnet").num_features
    guard = ood.fit_guard(gaussian(200, dim, 0), gaussian(100, dim, 1))
    save_checkpoint(tmp_path / "guarded.pt", dataclasses.replace(plain, guard=guard))
    loaded = load_checkpoint(tmp_path / "guarded.pt")
    assert set(loaded.state_dict) == set(plain.state_dict)  # the guard's tensors are not weights
    for name in ("mean", "projection", "precision"):
        assert np.array_equal(getattr(loaded.guard, name), getattr(guard, name))
    assert loaded.guard.header() == guard.header()
    assert Predictor(plain, device="cpu").guard_status.startswith("off")
    assert Predictor(loaded, device="cpu").guard_status.startswith("on: Mahalanobis")


def test_a_damaged_guard_or_a_clashing_weight_name_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    plain = load_checkpoint(make_checkpoint(tmp_path / "plain.pt"))
    dim = create_model("test_resnet").num_features
    guarded = save_checkpoint(
        tmp_path / "guarded.pt", dataclasses.replace(plain, guard=ood.fit_guard(gaussian(50, dim, 0), gaussian(20, dim, 1)))
    )
    from safetensors import safe_open

    with safe_open(guarded, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(guarded)
    tensors["guard.precision"] = tensors["guard.precision"][:3]
    save_file(tensors, tmp_path / "damaged.pt", metadata=metadata)
    with pytest.raises(CxrdxError, match="damaged input guard"):
        load_checkpoint(tmp_path / "damaged.pt")
    header = json.loads(metadata["checkpoint"])
    header["guard"]["threshold"] = "high"
    save_file(load_file(guarded), tmp_path / "typed.pt", metadata={**metadata, "checkpoint": json.dumps(header)})
    with pytest.raises(CxrdxError, match="header field 'guard'"):
        load_checkpoint(tmp_path / "typed.pt")
    clash = dataclasses.replace(plain, state_dict={**plain.state_dict, "guard.mean": torch.zeros(1)})
    with pytest.raises(CxrdxError, match="clash"):
        save_checkpoint(tmp_path / "clash.pt", clash)


# --- on phantoms: a tiny model, held-out phantoms against photographs, text, blank and noise --------------


@pytest.fixture(scope="module")
def guarded(phantom_cache: Path, phantom_split: Path) -> tuple[Predictor, np.ndarray]:
    """A randomly initialised test_resnet with its guard fitted on the phantom fixture's training split,
    and the held-out (test split) phantoms as prepared pixels. Random convolutional features already
    tell phantoms from other images; the demo's trained model is measured in the README."""
    cache = open_cache(phantom_cache)
    split = read_split(phantom_split)
    rows = {name: rows_for_split(cache, split, name) for name in ("train", "val", "test")}
    torch.manual_seed(0)
    model = create_model("test_resnet").eval()
    guard = ood.fit_on_cache(model, cache, rows["train"], rows["val"], SIZE, [0.5], [0.25])
    ckpt = Checkpoint(
        model_name="test_resnet", state_dict=model.state_dict(), input_size=SIZE, mean=[0.5], std=[0.25], cache_size=SIZE, guard=guard
    )
    return Predictor(ckpt, device="cpu"), np.asarray(cache.images[rows["test"]])


def accepted_phantom(predictor: Predictor, test_pixels: np.ndarray) -> np.ndarray:
    return next(x for x, p in zip(test_pixels, predictor.predict(test_pixels)) if p.accepted)


def test_held_out_phantoms_pass_and_foreign_images_are_refused(guarded: tuple[Predictor, np.ndarray]) -> None:
    pytest.importorskip("skimage")
    predictor, test_pixels = guarded
    assert predictor.guard.val_acceptance >= 0.95
    held_out = predictor.predict(test_pixels)
    foreign = foreign_images(SIZE)
    refused = predictor.predict(list(foreign.values()), names=list(foreign))
    assert len(held_out) == 48 and len(refused) >= 45
    # 168 training images for 96 features: a loose fit, so held-out phantoms are judged at 75 %, not 95 %
    assert np.mean([p.accepted for p in held_out]) >= 0.75
    assert np.mean([not p.accepted for p in refused]) >= 0.9
    scores = lambda ps: np.array([p.ood_score for p in ps])
    assert np.median(scores(refused)) > 2 * np.median(scores(held_out))
    for kind in ("skimage", "text", "blank", "noise"):
        kept = [p.name for p in refused if p.name.startswith(kind) and p.accepted]
        assert len(kept) <= 1, f"{kind} images accepted: {kept}"


def test_a_refused_image_gets_no_probabilities_unless_allowed(guarded: tuple[Predictor, np.ndarray]) -> None:
    predictor, test_pixels = guarded
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    refused, accepted = predictor.predict([noise, accepted_phantom(predictor, test_pixels)], names=["noise.png", "phantom.png"])
    assert not refused.accepted and refused.probabilities == {} and refused.positives == []
    assert "out-of-distribution score" in refused.reason and refused.flags == ["out-of-distribution"]
    assert refused.ood_score > predictor.guard.threshold
    assert accepted.accepted and len(accepted.probabilities) == len(FINDINGS) and accepted.ood_score <= predictor.guard.threshold
    anyway = predictor.predict([noise], names=["noise.png"], allow_ood=True)[0]
    assert not anyway.accepted and anyway.reason == refused.reason and len(anyway.probabilities) == len(FINDINGS)
    assert np.allclose(list(anyway.probabilities.values()), predictor.predict_proba(noise)[0])
    table = pd.read_csv(io.StringIO(format_predictions([refused, accepted], "csv")))
    assert table["ood_score"].tolist() == pytest.approx([refused.ood_score, accepted.ood_score])
    assert table["accepted"].tolist() == [False, True]
    assert json.loads(format_predictions([refused], "json"))[0]["ood_score"] == pytest.approx(refused.ood_score)
    assert "REFUSED: not like the training images" in format_predictions([refused], "table")


def test_without_a_guard_the_score_is_none(tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "plain.pt"), device="cpu")
    prediction = predictor.predict(chest_like(SIZE))[0]
    assert prediction.accepted and prediction.ood_score is None and len(prediction.probabilities) == len(FINDINGS)


def test_the_service_answers_a_refused_upload_with_422(guarded: tuple[Predictor, np.ndarray]) -> None:
    predictor, test_pixels = guarded
    client = TestClient(create_app(predictor), base_url="http://localhost")

    def post(pixels: np.ndarray):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return client.post("/v1/predict", files={"file": ("x.png", out.getvalue(), "image/png")})

    ok = post(accepted_phantom(predictor, test_pixels))
    assert ok.status_code == 200 and ok.json()["ood_score"] <= predictor.guard.threshold
    refused = post(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
    assert refused.status_code == 422
    assert refused.json()["detail"].startswith("refused by the input guard: not like the training images")
    assert client.get("/v1/model").json()["input_guard"].startswith("on: Mahalanobis")


# --- train and calibrate --------------------------------------------------------------------------------


def test_calibrate_ood_refits_the_guard(phantom_cache: Path, phantom_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "split.csv").write_bytes(phantom_split.read_bytes())
    ckpt = load_checkpoint(make_checkpoint(run / "checkpoints" / "best.pt"))
    ckpt.config = {"data": {"cache": str(phantom_cache)}, "seed": 0}
    save_checkpoint(run / "checkpoints" / "best.pt", ckpt)
    assert main(["calibrate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--ood", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "input guard on: Mahalanobis" in out
    guard = load_checkpoint(run / "checkpoints" / "best.pt").guard
    assert guard is not None and guard.train_images == 168 and guard.val_images == 24 and guard.val_acceptance >= 0.95
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    notes = json.loads((tmp_path / "eval" / "metrics.json").read_text())["notes"]
    [note] = [n for n in notes if n.startswith("input guard")]
    assert "of 48 images" in note and "accepted by the content check" in note and "the metrics include all of them" in note
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["settings"]["images"] == 48


def test_a_guard_of_another_width_is_refused_by_the_predictor(tmp_path: Path) -> None:
    plain = load_checkpoint(make_checkpoint(tmp_path / "plain.pt"))
    narrow = ood.fit_guard(gaussian(50, 8, 0), gaussian(20, 8, 1))
    with pytest.raises(CxrdxError, match="fitted on 8 features, but test_resnet gives 96"):
        Predictor(dataclasses.replace(plain, guard=narrow), device="cpu")
