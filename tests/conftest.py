"""Shared fixtures: the ../shared data (skipped when absent) and small phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXRDX_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`, or skip: a user's fresh clone has no ../shared."""
    data = SHARED / "data"
    if not (data / "chestxray14").is_dir():
        pytest.skip(f"{data} is absent (only CI and developers have ../shared)")
    return data


@pytest.fixture(scope="session")
def nih_sample(shared_data: Path) -> Path:
    """The 120 real ChestX-ray14 images with their Data_Entry rows."""
    return shared_data / "nih_sample"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom dataset (ChestX-ray14 layout), made once per test session."""
    from cxrdx.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, n=240, size=64, seed=0, tail_floor=0.05)
    return out


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantoms prepared into a 64-px cache."""
    from cxrdx.data.cache import prepare_cache

    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare_cache(phantom_dir, out, size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def phantom_split(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patient-wise 70/10/20 split file of the phantoms."""
    from cxrdx.data.metadata import read_metadata
    from cxrdx.data.splits import make_split, write_split

    index = read_metadata(phantom_dir / "Data_Entry_2017.csv")
    out = tmp_path_factory.mktemp("split") / "split.csv"
    write_split(make_split(index, strategy="patient", seed=0), out)
    return out


@pytest.fixture(scope="module")
def cam_model():
    """A tiny random 1-channel, 14-output timm ResNet in eval mode, for explanation tests."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=14, in_chans=1, pretrained=False).eval()


@pytest.fixture(scope="module")
def cam_image():
    """One seeded 1x1x64x64 random input."""
    import torch

    return torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
