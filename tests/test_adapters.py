"""Dataset adapters on tiny folders written in each dataset's real layout: labels, views, image lookup."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdx.data.datasets import ADAPTERS, list_datasets, read_dataset
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS

NAN = np.nan


def image(path: Path) -> Path:
    """A tiny grey image at `path` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def dicom(path: Path, view: str, age: str, sex: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.ViewPosition, ds.PatientAge, ds.PatientSex = view, age, sex
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def labels(index, name: str) -> list[float]:
    return index.table[name].tolist()


def same(a: list[float], b: list[float]) -> bool:
    return np.array_equal(np.array(a, float), np.array(b, float), equal_nan=True)


def test_registry_lists_every_adapter() -> None:
    assert list_datasets() == ["chexpert", "generic", "mimic", "padchest", "rsna", "vindr"]
    assert ADAPTERS["chexpert"].extra_labels[:2] == ("Enlarged Cardiomediastinum", "Lung Opacity")
    with pytest.raises(CxrdxError, match="unknown dataset 'nih2'; choose one of chexpert"):
        read_dataset("nih2", ".")


# --- CheXpert --------------------------------------------------------------------------------------

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices\n"
)
ROOT = "CheXpert-v1.0-small"


@pytest.fixture
def chexpert_dir(tmp_path: Path) -> Path:
    root = tmp_path / ROOT
    root.mkdir()
    (root / "train.csv").write_text(
        CHEXPERT_HEADER
        + f"{ROOT}/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n"
        + f"{ROOT}/train/patient00001/study1/view2_lateral.jpg,Female,68,Lateral,,1.0,,,,,,,,,,,,,\n"
        + f"{ROOT}/train/patient00002/study2/view1_frontal.jpg,Male,0,Frontal,PA,,,-1.0,1.0,,-1.0,,,,,1.0,,,\n"
        + f"{ROOT}/train/patient00003/study1/view1_frontal.jpg,Male,45,Frontal,PA,,,1.0,,,,,,,,,,,\n"
    )
    (root / "valid.csv").write_text(
        CHEXPERT_HEADER + f"{ROOT}/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,0.0,1.0,1.0,1.0,0.0,1.0,"
        "0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
    )
    for rel in (
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00001/study1/view2_lateral.jpg",
        "train/patient00002/study2/view1_frontal.jpg",
        "valid/patient64541/study1/view1_frontal.jpg",
    ):
        image(root / rel)
    return tmp_path


def test_chexpert_layout_views_and_missing_images(chexpert_dir: Path) -> None:
    for data_dir in (chexpert_dir, chexpert_dir / ROOT):  # the dataset folder or the folder above it
        index = read_dataset("chexpert", data_dir)
        assert index.table["Image Index"].tolist() == [
            "train/patient00001/study1/view1_frontal.jpg",
            "train/patient00002/study2/view1_frontal.jpg",
            "valid/patient64541/study1/view1_frontal.jpg",
        ]
        assert index.missing == ["train/patient00003/study1/view1_frontal.jpg"]
        assert index.excluded_views == {"LATERAL": 1}
        assert all(Path(p).is_file() for p in index.table["path"])
    table = index.table
    assert table["Patient ID"].tolist() == ["patient00001", "patient00002", "patient64541"]
    assert table["Official Split"].tolist() == ["train", "train", "val"]
    assert table["View Position"].tolist() == ["AP", "PA", "AP"]
    assert same(table["Patient Age"].tolist(), [68, NAN, 73])  # CheXpert writes 0 for an unknown age
    assert table["Patient Gender"].tolist() == ["F", "M", "M"]
    assert table[list(FINDINGS)].dtypes.eq(np.float32).all()
    # No Finding = 1 makes the unmentioned pathologies 0, but not Support Devices
    assert same(labels(index, "Cardiomegaly"), [0, NAN, 1])
    assert same(labels(index, "Effusion"), [0, 1, 0])
    assert same(labels(index, "Support Devices"), [1, NAN, 1])
    assert index.unlabelled() == ["Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening"]


def test_chexpert_uncertain_policies(chexpert_dir: Path) -> None:
    expected = {"ignore": NAN, "positive": 1, "negative": 0}
    for policy, value in expected.items():
        index = read_dataset("chexpert", chexpert_dir, uncertain=policy)
        assert same(labels(index, "Cardiomegaly"), [0, value, 1])
        assert same(labels(index, "Edema"), [0, value, 1])
    negative = read_dataset("chexpert", chexpert_dir, unmentioned="negative")
    assert same(labels(negative, "Atelectasis"), [0, 0, 0]) and same(labels(negative, "Support Devices"), [1, 0, 1])
    assert negative.table["Mass"].isna().all()  # not a CheXpert observation: still not labelled
    with pytest.raises(CxrdxError, match="uncertain must be one of ignore, positive, negative, not 'maybe'"):
        read_dataset("chexpert", chexpert_dir, uncertain="maybe")
    with pytest.raises(CxrdxError, match="dataset 'chexpert'.*unexpected keyword argument 'readers'"):
        read_dataset("chexpert", chexpert_dir, readers="any")


def test_chexpert_rejects_a_bad_label(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        CHEXPERT_HEADER + f"{ROOT}/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,,,2.0,,,,,,,,,,,\n"
    )
    with pytest.raises(CxrdxError, match=r"train.csv: line 2: Cardiomegaly .2.0.; expected one of 0, 1, -1 or blank"):
        read_dataset("chexpert", tmp_path)
    with pytest.raises(CxrdxError, match="no CheXpert label table"):
        read_dataset("chexpert", image(tmp_path / "images" / "a.png").parent)


# --- MIMIC-CXR-JPG ---------------------------------------------------------------------------------

MIMIC_LABELS = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
    "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
)


def test_mimic_layout_join_and_split(tmp_path: Path) -> None:
    def gz(name: str, text: str) -> None:
        (tmp_path / name).write_bytes(gzip.compress(text.encode()))

    gz("mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABELS + "10000032,50414267,,,,,,,,,1.0,,,,,\n10000898,50771383,,-1.0,,1.0,,,,,,,,,,\n")
    gz("mimic-cxr-2.0.0-negbio.csv.gz", MIMIC_LABELS + "10000032,50414267,,,,,,,,,1.0,,,,,\n10000898,50771383,,1.0,,1.0,,,,,,,,,,\n")
    gz(
        "mimic-cxr-2.0.0-metadata.csv.gz",
        "dicom_id,subject_id,study_id,ViewPosition\n"
        "a1,10000032,50414267,PA\na2,10000032,50414267,LATERAL\nb1,10000898,50771383,AP\n"
        "c1,10001884,50000014,AP\nd1,10001884,50000015,AP AXIAL\n",
    )
    gz(
        "mimic-cxr-2.0.0-split.csv.gz",
        "dicom_id,study_id,subject_id,split\na1,50414267,10000032,train\n"
        "a2,50414267,10000032,train\nb1,50771383,10000898,validate\nc1,50000014,10001884,test\n",
    )
    for rel in ("p10/p10000032/s50414267/a1.jpg", "p10/p10000032/s50414267/a2.jpg", "p10/p10001884/s50000014/c1.jpg"):
        image(tmp_path / "files" / rel)

    index = read_dataset("mimic", tmp_path)
    table = index.table
    assert table["Image Index"].tolist() == ["p10/p10000032/s50414267/a1.jpg", "p10/p10001884/s50000014/c1.jpg"]
    assert index.missing == ["p10/p10000898/s50771383/b1.jpg"]
    assert index.excluded_views == {"LATERAL": 1, "AP AXIAL": 1}
    assert table["Patient ID"].tolist() == ["10000032", "10001884"]
    assert table["Official Split"].tolist() == ["train", "test"]
    assert same(labels(index, "Effusion"), [0, NAN])  # No Finding; a study without a label row: not labelled
    assert table["Support Devices"].isna().all()

    every = read_dataset("mimic", tmp_path, views=None, uncertain="positive", labeller="negbio")
    assert every.missing == ["p10/p10000898/s50771383/b1.jpg", "p10/p10001884/s50000015/d1.jpg"]
    assert every.excluded_views == {}
    chexpert_labels = read_dataset("mimic", tmp_path, views=None, uncertain="negative")
    assert same(labels(chexpert_labels, "Cardiomegaly"), [0, 0, NAN])
    with pytest.raises(CxrdxError, match="labeller must be one of chexpert, negbio"):
        read_dataset("mimic", tmp_path, labeller="chexbert")


# --- PadChest --------------------------------------------------------------------------------------


def test_padchest_terms_views_and_folders(tmp_path: Path) -> None:
    rows = [
        ("a.png", "0", "p1", "20140915", "1930.0", "F", "PA", "['normal']"),
        ("b.png", "0", "p1", "20150914", "1930.0", "F", "L", "['pleural effusion', 'nodule']"),
        (
            "c.png",
            "1",
            "p2",
            "20150101",
            "1950.0",
            "M",
            "AP_horizontal",
            "['pseudonodule', 'subcutaneous emphysema', 'pericardial effusion']",
        ),
        ("d.png", "1", "p3", "20160101", "", "M", "PA", "['unchanged']"),
        ("e.png", "1", "p4", "20160101", "1940.0", "M", "PA", ""),
        ("f.png", "2", "p5", "20160101", "1940.0", "F", "PA", "['hydropneumothorax', 'soft tissue mass', 'pulmonary mass']"),
    ]
    columns = ["ImageID", "ImageDir", "PatientID", "StudyDate_DICOM", "PatientBirth", "PatientSex_DICOM", "Projection", "Labels"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", index=True)
    for name, folder in (("a.png", "0"), ("b.png", "0"), ("c.png", "1"), ("d.png", "1"), ("e.png", "1")):
        image(tmp_path / folder / name)

    index = read_dataset("padchest", tmp_path)
    table = index.table
    assert table["Image Index"].tolist() == ["a.png", "c.png", "d.png", "e.png"]
    assert index.missing == ["f.png"] and index.excluded_views == {"LATERAL": 1}
    assert table["View Position"].tolist() == ["PA", "AP", "PA", "PA"]
    assert same(table["Patient Age"].tolist(), [84, 65, NAN, 76])
    assert same(labels(index, "Nodule"), [0, 0, NAN, NAN])  # a pseudonodule is no nodule; 'unchanged' says nothing
    assert same(labels(index, "Emphysema"), [0, 0, NAN, NAN])
    assert same(labels(index, "Effusion"), [0, 0, NAN, NAN])
    every = read_dataset("padchest", tmp_path, views=None).table.set_index("Image Index")
    assert every.loc["b.png", "Effusion"] == 1 and every.loc["b.png", "Nodule"] == 1
    assert index.unlabelled() == []


def test_padchest_rejects_a_label_cell_that_is_no_list(tmp_path: Path) -> None:
    path = tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    path.write_text("ImageID,PatientID,Projection,Labels\na.png,p1,PA,['normal']\nb.png,p2,PA,pleural effusion\n")
    with pytest.raises(CxrdxError, match="line 3: Labels 'pleural effusion'; expected a list"):
        read_dataset("padchest", tmp_path)


# --- VinDr-CXR -------------------------------------------------------------------------------------

VINDR_CLASSES = "Cardiomegaly,Nodule/Mass,Pleural effusion,Pneumonia,Rib fracture,No finding"


def test_vindr_readers_nodule_mass_and_layout(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "image_labels_train.csv").write_text(
        f"image_id,rad_ID,{VINDR_CLASSES}\n"
        "img1,R1,1,0,0,0,0,0\nimg1,R2,1,1,0,0,0,0\nimg1,R3,0,0,0,0,0,1\n"
        "img2,R4,0,0,0,0,0,1\nimg2,R5,0,0,1,0,0,0\nimg2,R6,0,0,0,0,0,1\n"
        "img3,R1,0,0,0,1,0,0\nimg3,R2,0,0,0,1,0,0\nimg3,R3,0,0,0,1,0,0\n"
    )
    (annotations / "image_labels_test.csv").write_text(f"image_id,{VINDR_CLASSES}\nimg4,0,1,0,0,1,0\n")
    for rel in ("train/img1.dicom", "train/img2.dicom", "test/img4.dicom"):
        dicom(tmp_path / rel, "PA", "045Y", "F")

    index = read_dataset("vindr", tmp_path)
    table = index.table
    assert table["Image Index"].tolist() == ["img1", "img2", "img4"] and index.missing == ["img3"]
    assert table["Official Split"].tolist() == ["train", "train", "test"]
    assert table["Patient ID"].tolist() == table["Image Index"].tolist()
    assert same(labels(index, "Cardiomegaly"), [1, 0, 0])
    assert same(labels(index, "Effusion"), [0, 1, 0])
    assert same(labels(index, "Nodule"), [NAN, 0, NAN]) and same(labels(index, "Mass"), [NAN, 0, NAN])
    assert same(labels(index, "Nodule/Mass"), [1, 0, 1]) and same(labels(index, "Rib fracture"), [0, 0, 1])
    assert index.unlabelled() == [
        "Atelectasis",
        "Consolidation",
        "Edema",
        "Emphysema",
        "Fibrosis",
        "Hernia",
        "Infiltration",
        "Pleural_Thickening",
        "Pneumothorax",
    ]
    majority = read_dataset("vindr", tmp_path, readers="majority")
    assert same(labels(majority, "Cardiomegaly"), [1, 0, 0])
    assert same(labels(majority, "Nodule/Mass"), [0, 0, 1]) and same(labels(majority, "Effusion"), [0, 0, 0])
    assert same(labels(read_dataset("vindr", tmp_path, views=None), "Pneumonia"), [0, 0, 0])


def test_vindr_box_file_of_the_challenge(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "img1,Cardiomegaly,3,R8,1,1,5,5\nimg1,Cardiomegaly,3,R9,1,1,5,5\nimg1,No finding,14,R10,,,,\n"
        "img2,No finding,14,R8,,,,\nimg2,No finding,14,R9,,,,\nimg2,Pleural thickening,11,R10,1,1,2,2\n"
    )
    image(tmp_path / "train" / "img1.png")
    index = read_dataset("vindr", tmp_path)
    assert index.table["Image Index"].tolist() == ["img1"] and index.missing == ["img2"]
    boxes = ADAPTERS["vindr"].read(tmp_path, readers="majority")
    assert same(boxes["Cardiomegaly"].tolist(), [1, 0]) and same(boxes["Pleural_Thickening"].tolist(), [0, 0])
    assert boxes["Edema"].isna().all()  # the challenge's 14 classes have no Edema


# --- RSNA Pneumonia --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # the challenge's DICOMs write ages as "51"
def test_rsna_views_from_the_dicom_headers(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\nid1,,,,,0\nid2,10,10,5,5,1\nid2,20,20,5,5,1\nid3,,,,,0\nid4,,,,,1\n"
    )
    folder = tmp_path / "stage_2_train_images"
    dicom(folder / "id1.dcm", "PA", "51", "F")
    dicom(folder / "id2.dcm", "AP", "048Y", "M")
    dicom(folder / "id3.dcm", "LL", "30", "M")
    index = read_dataset("rsna", tmp_path)
    table = index.table
    assert table["Image Index"].tolist() == ["id1", "id2"]
    assert index.missing == ["id4"] and index.excluded_views == {"LATERAL": 1}
    assert table["View Position"].tolist() == ["PA", "AP"] and table["Patient Gender"].tolist() == ["F", "M"]
    assert same(table["Patient Age"].tolist(), [51, 48])
    assert same(labels(index, "Pneumonia"), [0, 1]) and same(labels(index, "Lung Opacity"), [0, 1])
    assert len(index.unlabelled()) == 13


def test_rsna_rejects_an_image_with_both_targets(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\nid1,,,,,0\nid1,1,1,1,1,1\n")
    (tmp_path / "stage_2_train_images_dicom_headers.csv").write_text("PatientID,ViewPosition,PatientAge,PatientSex\nid1,PA,3,F\n")
    with pytest.raises(CxrdxError, match="image 'id1' has rows with Target 0 and 1"):
        read_dataset("rsna", tmp_path)


# --- a hospital's own CSV --------------------------------------------------------------------------


def test_generic_csv(tmp_path: Path) -> None:
    outside = image(tmp_path / "elsewhere" / "x.png")
    (tmp_path / "labels.csv").write_text(
        "path,Patient ID,view,sex,age,Effusion,pleural thickening,Pneumothorax\n"
        "2024/0001.png,P17,PA,F,64,1,0,\n"
        "2024/0002.png,P17,LATERAL,F,64,0,1,-1\n"
        "./2024/0003.jpg,P18,AP,male,,0,,-1\n"
        "2024/0004.png,P19,,,,0,0,0\n"
        f"{outside},P20,PA,M,30,1,1,1\n"
    )
    for rel in ("2024/0001.png", "2024/0002.png", "2024/0003.jpg"):
        image(tmp_path / rel)
    index = read_dataset("generic", tmp_path, uncertain="positive")
    table = index.table
    assert table["Image Index"].tolist() == ["2024/0001.png", "./2024/0003.jpg", str(outside)]
    assert index.missing == ["2024/0004.png"]  # unknown view: kept, so reported missing
    assert index.excluded_views == {"LATERAL": 1}
    assert table["Patient Gender"].tolist() == ["F", "M", "M"]
    assert same(table["Patient Age"].tolist(), [64, NAN, 30])
    assert same(labels(index, "Pneumothorax"), [NAN, 1, 1])
    assert same(labels(index, "Pleural_Thickening"), [0, NAN, 1])
    assert index.unlabelled() == [f for f in FINDINGS if f not in ("Effusion", "Pleural_Thickening", "Pneumothorax")]


def test_generic_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("path,Effusion,Accession\na.png,1,77\n")
    with pytest.raises(CxrdxError, match=r"export.csv: unknown or repeated column\(s\) 'Accession'"):
        read_dataset("generic", tmp_path, labels=str(path))
    path.write_text("image,Effusion\na.png,yes\n")
    with pytest.raises(CxrdxError, match="line 2: Effusion 'yes'; expected one of 0, 1, -1 or blank"):
        read_dataset("generic", tmp_path, labels=str(path))
    path.write_text("Effusion\n1\n")
    with pytest.raises(CxrdxError, match="no image path column"):
        read_dataset("generic", tmp_path, labels=str(path))
    path.write_text("path,Effusion\na.png,1\na.png,0\n")
    with pytest.raises(CxrdxError, match="line 3: image path 'a.png' is empty or repeats"):
        read_dataset("generic", tmp_path, labels=str(path))
