"""Pointing game, IoU and box handling on hand-computed cases; `cxrdx localize` and `cxrdx explain` end to end."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from cxrdx.checkpoint import Checkpoint, save_checkpoint
from cxrdx.cli import main
from cxrdx.errors import CxrdxError
from cxrdx.explain.localization import (
    box_iou,
    box_mask,
    boxed_images,
    localize,
    markdown_tables,
    peak,
    pointing_hit,
    read_boxes,
    scale_boxes,
    summarize,
    threshold_map,
)
from cxrdx.findings import FINDINGS

NIH_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


def write_boxes(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    return path


def test_read_boxes_nih_layout_and_spelling(tmp_path):
    path = write_boxes(tmp_path / "b.csv", ["a.png,Infiltrate,10.5,20,30,40", "a.png,Mass,1,2,3,4", "b.png,Effusion,0,0,5,5"])
    boxes = read_boxes(path)
    assert list(boxes.columns) == ["Image Index", "Finding", "x", "y", "w", "h"]
    assert boxes["Finding"].tolist() == ["Infiltration", "Mass", "Effusion"]
    assert boxes.iloc[0][["x", "y", "w", "h"]].tolist() == [10.5, 20, 30, 40]
    packed = tmp_path / "b.csv.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    pd.testing.assert_frame_equal(read_boxes(packed), boxes)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a.png,Tumour,1,2,3,4", "line 2: unknown finding 'Tumour'"),
        ("a.png,Mass,1,2,-3,4", "line 2: box w = '-3'"),
        ("a.png,Mass,1,x,3,4", "line 2: box y = 'x'"),
    ],
)
def test_read_boxes_names_the_bad_line(tmp_path, row, message):
    with pytest.raises(CxrdxError, match=message):
        read_boxes(write_boxes(tmp_path / "b.csv", [row]))


def test_read_the_official_nih_boxes(shared_data):
    boxes = read_boxes(shared_data / "chestxray14" / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984 and boxes["Image Index"].nunique() == 880
    assert set(boxes["Finding"]) == {
        "Atelectasis",
        "Cardiomegaly",
        "Effusion",
        "Infiltration",
        "Mass",
        "Nodule",
        "Pneumonia",
        "Pneumothorax",
    }
    assert boxes[["x", "y"]].to_numpy().max() < 1024


def test_scale_boxes_from_original_pixels_to_the_input():
    boxes = pd.DataFrame(
        {
            "Image Index": ["a", "b"],
            "Finding": ["Mass", "Mass"],
            "x": [512.0, 100.0],
            "y": [256.0, 100.0],
            "w": [100.0, 50.0],
            "h": [50.0, 20.0],
        }
    )
    nih = scale_boxes(boxes, (1024, 1024), (256, 256))
    assert nih[["x", "y", "w", "h"]].to_numpy().tolist() == [[128, 64, 25, 12.5], [25, 25, 12.5, 5]]
    per_image = scale_boxes(boxes, {"a": (1024, 1024), "b": (200, 400)}, (100, 100))
    assert per_image.iloc[1][["x", "y", "w", "h"]].tolist() == [50, 25, 25, 5]  # stretched like resize_square
    with pytest.raises(CxrdxError, match="no image size"):
        scale_boxes(boxes, {"a": (1024, 1024)}, (100, 100))


def test_box_mask_takes_pixels_whose_centre_is_inside():
    mask = box_mask(np.array([[1, 2, 2, 1]]), (5, 5))
    assert np.argwhere(mask).tolist() == [[2, 1], [2, 2]]
    assert np.argwhere(box_mask(np.array([[0.6, 0, 1, 1]]), (2, 3))).tolist() == [[0, 1]]
    assert box_mask(np.array([[0, 0, 1, 1], [4, 4, 1, 1]]), (5, 5)).sum() == 2  # union


def test_pointing_game_hand_cases():
    saliency = np.zeros((6, 6))
    saliency[3, 4] = 1.0  # centre (x 4.5, y 3.5)
    assert pointing_hit(saliency, np.array([[4, 3, 1, 1]]))
    assert not pointing_hit(saliency, np.array([[0, 0, 2, 2]]))
    assert pointing_hit(saliency, np.array([[0, 0, 2, 2], [4, 0, 2, 4]]))  # any box of the finding
    # distance from (4.5, 3.5) to the box [0, 2] x [0, 2] is hypot(2.5, 1.5) = 2.915
    assert pointing_hit(saliency, np.array([[0, 0, 2, 2]]), tolerance=3.0)
    assert not pointing_hit(saliency, np.array([[0, 0, 2, 2]]), tolerance=2.9)
    assert not pointing_hit(np.zeros((6, 6)), np.array([[0, 0, 6, 6]]))  # a flat map points nowhere
    plateau = np.zeros((6, 6))
    plateau[0:2, 3:6] = 1.0  # a clamped border of an upsampled map: the middle (0, 4) counts, not (0, 3)
    assert peak(plateau) == (0, 4)
    assert pointing_hit(plateau, np.array([[4, 0, 1, 1]])) and not pointing_hit(plateau, np.array([[3, 0, 1, 1]]))


def test_iou_hand_cases():
    saliency = np.array([[0.0, 0.2, 0.6, 1.0], [0.0, 0.1, 0.5, 0.9], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4]])
    box = np.array([[2, 0, 2, 1]])  # pixels (0,2) and (0,3)
    # >= 0.5 x max: (0,2) (0,3) (1,2) (1,3) -> intersection 2, union 4
    assert box_iou(saliency, box, threshold=0.5) == pytest.approx(0.5)
    # top 12.5 % of 16 pixels = 2 pixels: (0,3) and (1,3) -> intersection 1, union 3
    assert box_iou(saliency, box, threshold=0.125, mode="top") == pytest.approx(1 / 3)
    assert threshold_map(saliency, 0.125, "top").sum() == 2
    assert box_iou(np.zeros((4, 4)), box) == 0.0
    with pytest.raises(CxrdxError, match="threshold mode"):
        threshold_map(saliency, 0.5, "otsu")


def test_summary_per_method_and_finding():
    records = pd.DataFrame(
        {
            "Image Index": ["a", "b", "c", "a", "b", "c"],
            "Finding": ["Mass", "Mass", "Effusion"] * 2,
            "method": ["groupcam"] * 3 + ["gradcam"] * 3,
            "hit": [True, False, True, False, False, True],
            "iou": [0.5, 0.1, 0.3, 0.0, 0.2, 0.4],
            "flat": [False, False, False, True, False, False],
        }
    )
    summary = summarize(records).set_index(["method", "Finding"])
    assert summary.loc[("groupcam", "Mass"), "pointing_game"] == 0.5
    assert summary.loc[("groupcam", "all"), "pointing_game"] == pytest.approx(2 / 3)
    assert summary.loc[("gradcam", "all"), "iou"] == pytest.approx(0.2)
    assert summary.loc[("gradcam", "all"), "flat"] == 1 and summary.loc[("gradcam", "Mass"), "n"] == 2
    text = markdown_tables(summarize(records), 0.5, "relative")
    assert "### groupcam" in text and "| Mass | 2 | 0.500 | 0.300 | 0 |" in text


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random test_resnet checkpoint: 64-px cache images, 32-px model input."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=14, in_chans=1, pretrained=False)
    ckpt = Checkpoint(model_name="test_resnet", state_dict=model.state_dict(), input_size=32, mean=[0.5], std=[0.25], cache_size=64)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", ckpt)


def test_localize_scales_boxes_to_the_input(tiny_checkpoint, phantom_dir, phantom_cache):
    from cxrdx.data.cache import open_cache
    from cxrdx.predict import Predictor

    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    boxes = read_boxes(phantom_dir / "BBox_List_2017.csv")
    names, load, missing = boxed_images(boxes, predictor, data_dir=phantom_dir, limit=3)
    assert len(names) == 3 and not missing
    image, size = load(names[0])
    assert image.shape == (1, 1, 32, 32) and size == (64, 64)  # phantoms are written at 64 px
    cached_names, cached_load, _ = boxed_images(boxes, predictor, cache=open_cache(phantom_cache), limit=3)
    cached_image, cached_size = cached_load(cached_names[0])
    assert cached_names == names and cached_size == (64, 64)
    torch.testing.assert_close(cached_image, image)  # cache path == file path
    assert boxed_images(boxes, predictor, data_dir=phantom_dir, box_size=128)[1](names[0])[1] == (128, 128)

    records = localize(predictor, ((n, *load(n)) for n in names), boxes, methods=("gradcam", "eigencam"))
    expected = boxes[boxes["Image Index"].isin(names)].drop_duplicates(["Image Index", "Finding"])
    assert len(records) == 2 * len(expected)
    assert records["iou"].between(0, 1).all() and records["hit"].dtype == bool
    first = records.iloc[0]
    logits = predictor.model(load(first["Image Index"])[0])[0].detach()
    assert first["probability"] == pytest.approx(float(torch.sigmoid(logits)[FINDINGS.index(first["Finding"])]), abs=1e-6)
    predictor.info = dataclasses.replace(predictor.info, temperature=[2.0] * len(FINDINGS))  # a calibrated checkpoint
    scaled = localize(predictor, ((n, *load(n)) for n in names[:1]), boxes, methods=("gradcam",)).iloc[0]
    assert scaled["probability"] == pytest.approx(float(torch.sigmoid(logits / 2)[FINDINGS.index(scaled["Finding"])]), abs=1e-6)


def test_localize_command(tiny_checkpoint, phantom_dir, phantom_split, tmp_path, capsys):
    out = tmp_path / "loc"
    code = main(
        [
            "localize",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data-dir",
            str(phantom_dir),
            "--methods",
            "gradcam",
            "eigencam",
            "--split",
            "test",
            "--split-file",
            str(phantom_split),
            "--limit",
            "3",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "### gradcam" in printed and "### eigencam" in printed and "| all |" in printed
    report = json.loads((out / "localization.json").read_text())
    assert report["images"] == 3 and {row["method"] for row in report["summary"]} == {"gradcam", "eigencam"}
    records = pd.read_csv(out / "localization_records.csv")
    split = pd.read_csv(phantom_split).set_index("Image Index")["split"]
    assert (split[records["Image Index"]] == "test").all()
    assert (out / "localization.md").read_text() in printed


def test_explain_command_files_and_cache_split(tiny_checkpoint, phantom_dir, phantom_cache, phantom_split, tmp_path, capsys):
    images = sorted((phantom_dir / "images").glob("*.png"))[:2]
    out = tmp_path / "maps"
    argv = ["explain", "--checkpoint", str(tiny_checkpoint), "--finding", "Effusion", "--groups", "4", "--device", "cpu"]
    assert main([*argv, "--out", str(out), *map(str, images)]) == 0
    for image in images:
        panel, raw = out / "Effusion" / f"{image.stem}.groupcam.png", out / "Effusion" / f"{image.stem}.groupcam.npy"
        assert panel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        saliency = np.load(raw)
        assert saliency.shape == (32, 32) and 0 <= saliency.min() and saliency.max() <= 1
    assert len(pd.read_csv(out / "explanations.csv")) == 2

    batch = tmp_path / "batch"
    assert (
        main(
            [
                *argv,
                "--method",
                "gradcam",
                "--cache",
                str(phantom_cache),
                "--split",
                "test",
                "--split-file",
                str(phantom_split),
                "--limit",
                "3",
                "--out",
                str(batch),
            ]
        )
        == 0
    )
    assert len(list((batch / "Effusion").glob("*.gradcam.png"))) == 3
    assert main([*argv, "--out", str(out)]) == 2  # neither files nor --split
    assert "give IMAGE files" in capsys.readouterr().err


def test_unknown_finding_is_a_user_error(tiny_checkpoint, phantom_dir, tmp_path, capsys):
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    assert main(["explain", "--checkpoint", str(tiny_checkpoint), "--finding", "Tumour", "--out", str(tmp_path), str(image)]) == 2
    assert "unknown finding 'Tumour'" in capsys.readouterr().err


def test_findings_cover_the_box_file_of_the_phantoms(phantom_dir):
    assert set(read_boxes(phantom_dir / "BBox_List_2017.csv")["Finding"]) <= set(FINDINGS)
