"""`cxrdx explain` on files: an unreadable image is reported and skipped, the others are still explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from PIL import Image

from cxrdx.checkpoint import Checkpoint, save_checkpoint
from cxrdx.cli import main


def tiny_checkpoint(folder: Path) -> Path:
    """A random test_resnet: 64-px images, 32-px model input."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=14, in_chans=1, pretrained=False)
    ckpt = Checkpoint(model_name="test_resnet", state_dict=model.state_dict(), input_size=32, mean=[0.5], std=[0.25], cache_size=64)
    return save_checkpoint(folder / "best.pt", ckpt)


def test_a_corrupt_file_is_reported_and_the_rest_explained(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = [tmp_path / "a.png", tmp_path / "c.png"]
    for path in good:
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "maps"

    code = main(
        [
            "explain",
            "--checkpoint",
            str(tiny_checkpoint(tmp_path)),
            "--finding",
            "Effusion",
            "--method",
            "gradcam",
            "--device",
            "cpu",
            "--out",
            str(out),
            *map(str, [good[0], bad, good[1]]),
        ]
    )

    assert code == 1
    captured = capsys.readouterr()
    assert "cxrdx explain: b.png: " in captured.err and "1 of 3 images could not be read" in captured.err
    assert "2 map(s) of 2 image(s)" in captured.out
    table = pd.read_csv(out / "explanations.csv", keep_default_na=False)
    assert table["Image Index"].tolist() == ["a.png", "b.png", "c.png"]
    assert "error" in table.columns
    failed = table.set_index("Image Index").loc["b.png"]
    assert failed["error"] and failed["png"] == "" and failed["Finding"] == ""
    assert failed["error"] in captured.err
    for row in table[table["Image Index"] != "b.png"].itertuples():
        assert row.error == "" and row.Finding == "Effusion"
        assert Path(row.png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.load(row.npy).shape == (32, 32)
    assert not (out / "Effusion" / "b.gradcam.png").exists()


def test_all_good_files_exit_zero_with_an_empty_error_column(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(image)
    out = tmp_path / "maps"
    assert (
        main(
            [
                "explain",
                "--checkpoint",
                str(tiny_checkpoint(tmp_path)),
                "--finding",
                "Mass",
                "--method",
                "gradcam",
                "--device",
                "cpu",
                "--out",
                str(out),
                str(image),
            ]
        )
        == 0
    )
    assert "could not be read" not in capsys.readouterr().err
    table = pd.read_csv(out / "explanations.csv", keep_default_na=False)
    assert table["error"].tolist() == [""]
