"""`cxrdx listen` as a DICOM node on loopback: C-ECHO, C-STORE of CR/DX in every transfer syntax, a bounded
queue that answers 0xA700 when full, results (JSON + SR) in OUT, forwarding to a PACS with an outbox that
keeps what could not be sent, an allow-list of calling AE titles; and end to end with dcmtk's echoscu and
storescu as the modality and storescp as the PACS. No patient name ever reaches a log or a file name."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import ENCODINGS, chest_like, dx_dataset, encode, make_checkpoint, tools_for
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from cxrdx.cli import main
from cxrdx.errors import CxrdxError
from cxrdx.listen import OUT_OF_RESOURCES, RESULT_CLASSES, STORAGE_CLASSES, TRANSFER_SYNTAXES, Node, NodeSettings, Peer
from cxrdx.predict import Predictor

PATIENT = "DOE^JANE"
PATIENT_ID = "JD-778899"
WAIT_S = 60.0  # bound on every wait for the node; the work itself takes well under a second


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def radiograph(path: Path, seed: int = 0, **header: object) -> Path:
    """A 12-bit chest DX of DOE^JANE, explicit VR little endian."""
    pixels = chest_like(64, seed).astype(np.uint16) * 16
    ds = dx_dataset(pixels, 12, **header)
    ds.PatientName, ds.PatientID = PATIENT, PATIENT_ID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(path, enforce_file_format=True)
    return path


def store(port: int, paths: list[Path], calling: str = "MODALITY") -> list[int | None]:
    """C-STORE each file to the node with pynetdicom; the status of each (None: association refused).
    A response the association lost (pynetdicom's requestor can drop one on a busy machine: an empty
    status) is asked again on a new association, as a modality would resend."""
    datasets = [pydicom.dcmread(p) for p in paths]
    statuses: list[int | None] = []
    for _ in range(3):
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRDX")
        if not assoc.is_established:
            return statuses + [None] * (len(paths) - len(statuses))
        try:
            for i, ds in enumerate(datasets[len(statuses) :], len(statuses) + 1):
                status = assoc.send_c_store(ds, msg_id=i)
                if "Status" not in status:
                    break
                statuses.append(int(status.Status))
        finally:
            if assoc.is_established:
                assoc.release()
        if len(statuses) == len(datasets):
            return statuses
    raise AssertionError("the node did not answer")


def echo(port: int, calling: str = "MODALITY") -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRDX")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


class Pacs:
    """A pynetdicom storage SCP standing in for the PACS: keeps what it receives."""

    def __init__(self, port: int = 0):
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="PACS")
        for sop_class in RESULT_CLASSES:
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", thresholds=[0.5] * 7 + [0.0] * 7)  # some positives


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture
def node(predictor: Predictor, tmp_path: Path) -> Iterator[Node]:
    with Node(predictor, NodeSettings(out=tmp_path / "out", port=0)) as running:
        yield running


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_echo_and_store_write_json_and_sr(node: Node, predictor: Predictor, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    files = [
        radiograph(tmp_path / "dx.dcm"),
        radiograph(tmp_path / "cr.dcm", 1, Modality="CR", SOPClassUID=STORAGE_CLASSES[0]),
        radiograph(tmp_path / "head.dcm", 2, BodyPartExamined="HEAD"),
    ]
    out = node.settings.out
    assert echo(node.port) == 0
    assert store(node.port, files) == [0, 0, 0]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    wait_for(lambda: len(results(out)) == 3, "three results")
    found = results(out)
    for path, uid in zip(files[:2], uids[:2]):
        [expected] = predictor.predict([path])
        result = found[uid]
        assert result["sop_instance_uid"] == uid and result["prediction"]["accepted"]
        assert result["prediction"]["probabilities"] == pytest.approx(expected.probabilities, abs=1e-9)
        assert result["outputs"] == [f"{uid}.sr.dcm"]
        sr = pydicom.dcmread(out / f"{uid}.sr.dcm")
        assert sr.Modality == "SR" and sr.PatientName == PATIENT  # identity copied from the source, as it must be
        assert (
            sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == uid
        )
    refused = found[uids[2]]
    assert not refused["prediction"]["accepted"] and refused["prediction"]["reason"] == "body part HEAD is not the chest"
    assert refused["prediction"]["probabilities"] == {} and refused["outputs"] == []
    assert not (out / f"{uids[2]}.sr.dcm").exists()
    assert list((out / "incoming").iterdir()) == []  # every received file processed and removed
    assert all(uid in caplog.text for uid in uids)  # the log names images by SOP Instance UID, never by patient
    assert PATIENT not in caplog.text and PATIENT_ID not in caplog.text


def test_other_sop_classes_are_not_negotiated(node: Node) -> None:
    ct = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    assert store(node.port, [ct]) == [None]  # the association offers nothing the node accepts


def test_every_transfer_syntax(node: Node, predictor: Predictor, tmp_path: Path) -> None:
    """Each syntax a PACS may send, written by an independent encoder (dcmtk, OpenJPEG): stored, decoded,
    predicted; the lossless ones exactly as their uncompressed original."""
    missing = sorted({tools_for(e) for e in ENCODINGS if shutil.which(tools_for(e)) is None})
    if missing:
        pytest.skip(f"DICOM encoders not installed: {', '.join(missing)} (Debian: dcmtk, libopenjp2-tools; `make dicomtools`)")
    original = radiograph(tmp_path / "original.dcm")
    [reference] = predictor.predict([original])
    implicit = pydicom.dcmread(original)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
    files = {"Implicit VR Little Endian": (tmp_path / "implicit.dcm", reference, 1e-6)}  # (file, expected, tolerance)
    for k, encoding in enumerate(ENCODINGS):
        path = encode(original, tmp_path / f"{k}.dcm", encoding)
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()  # one instance each
        ds.save_as(path, enforce_file_format=True)
        files[encoding.name] = (path, reference, 1e-6 if encoding.lossless else 0.05)
    eight = dx_dataset(chest_like(64).astype(np.uint16), 8)  # JPEG Baseline holds 8 bits
    eight.save_as(tmp_path / "eight.dcm", enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "+eb", str(tmp_path / "eight.dcm"), str(tmp_path / "baseline.dcm")], check=True, capture_output=True)
    files["JPEG Baseline"] = (tmp_path / "baseline.dcm", predictor.predict([tmp_path / "eight.dcm"])[0], 0.05)
    assert store(node.port, [path for path, _, _ in files.values()]) == [0] * len(files)
    wait_for(lambda: len(results(node.settings.out)) == len(files), "one result per syntax")
    found = results(node.settings.out)
    syntaxes = set()
    for name, (path, expected, tolerance) in files.items():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        prediction = found[header.SOPInstanceUID]["prediction"]
        assert prediction["accepted"] and prediction["error"] is None, name
        assert prediction["probabilities"] == pytest.approx(expected.probabilities, abs=tolerance), name
        syntaxes.add(header.file_meta.TransferSyntaxUID)
    assert syntaxes == set(TRANSFER_SYNTAXES) - {ExplicitVRLittleEndian}  # explicit VR: the other tests
    assert len(list(node.settings.out.glob("*.sr.dcm"))) == len(files)


class Held(Predictor):
    """A predictor that waits for `release` before each image, so the test controls when the queue drains."""

    def __init__(self, inner: Predictor):
        self.__dict__.update(inner.__dict__)
        self.started, self.release = threading.Event(), threading.Event()

    def predict(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(WAIT_S)
        return super().predict(*args, **kwargs)


def test_a_full_queue_answers_out_of_resources(predictor: Predictor, tmp_path: Path) -> None:
    held = Held(predictor)
    files = [radiograph(tmp_path / f"{i}.dcm", i) for i in range(3)]
    with Node(held, NodeSettings(out=tmp_path / "out", port=0, queue_size=1)) as node:
        assert store(node.port, files[:1]) == [0]
        assert held.started.wait(WAIT_S)  # the worker holds the first image: the queue is empty again
        assert store(node.port, files[1:]) == [0, OUT_OF_RESOURCES]  # one queued, one refused
        assert echo(node.port) == 0  # still serving
        held.release.set()
        wait_for(lambda: len(results(node.settings.out)) == 2, "the two accepted images")
    assert sorted(results(node.settings.out)) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in files[:2])
    assert list((tmp_path / "out" / "incoming").iterdir()) == []


class FailsOnce(Predictor):
    """A predictor whose first image fails with a message quoting the patient (as a header error might)."""

    def __init__(self, inner: Predictor):
        self.__dict__.update(inner.__dict__)
        self.calls = 0

    def predict(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise ValueError(f"invalid value {PATIENT!r}")
        return super().predict(*args, **kwargs)


def test_a_failing_image_does_not_stop_the_node(predictor: Predictor, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    files = [radiograph(tmp_path / f"{i}.dcm", i) for i in range(2)]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    with Node(FailsOnce(predictor), NodeSettings(out=tmp_path / "out", port=0)) as node:
        assert store(node.port, files) == [0, 0]
        wait_for(lambda: len(results(node.settings.out)) == 2, "both results")
    found = results(tmp_path / "out")
    assert found[uids[0]]["prediction"]["error"] == f"ValueError: invalid value {PATIENT!r}" and found[uids[0]]["outputs"] == []
    assert found[uids[1]]["prediction"]["probabilities"] and found[uids[1]]["outputs"] == [f"{uids[1]}.sr.dcm"]
    assert f"{uids[0]}: failed (ValueError)" in caplog.text and PATIENT not in caplog.text


def test_calling_ae_allow_list(predictor: Predictor, tmp_path: Path) -> None:
    with Node(predictor, NodeSettings(out=tmp_path / "out", port=0, allow_ae=("MODALITY",))) as node:
        assert echo(node.port, calling="MODALITY") == 0
        assert echo(node.port, calling="INTRUDER") is None
        assert store(node.port, [radiograph(tmp_path / "a.dcm")], calling="INTRUDER") == [None]
    assert not list((tmp_path / "out").glob("*.json"))


def test_forward_keeps_what_could_not_be_sent_and_retries(predictor: Predictor, tmp_path: Path) -> None:
    port = free_port()
    settings = NodeSettings(
        out=tmp_path / "out",
        port=0,
        forward=Peer("PACS", "127.0.0.1", port),
        heatmaps=True,
        send_attempts=2,
        retry_delay_s=0.05,
        outbox_retry_s=0.2,
    )
    files = [radiograph(tmp_path / f"{i}.dcm", i) for i in range(2)]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    expected = sorted([f"{u}.sr.dcm" for u in uids] + [f"{u}.heatmap.dcm" for u in uids])
    with Node(predictor, settings) as node:
        assert store(node.port, files) == [0, 0]
        wait_for(lambda: len(results(settings.out)) == 2, "two results")
        wait_for(lambda: sorted(p.name for p in settings.outbox.iterdir()) == expected, "the outbox to hold the results")
        pacs = Pacs(port)  # the PACS comes back: the periodic retry empties the outbox
        try:
            wait_for(lambda: not list(settings.outbox.iterdir()), "the outbox to empty")
        finally:
            pacs.stop()
    assert sorted(ds.SOPClassUID for ds in pacs.received) == sorted(RESULT_CLASSES * 2)
    srs = [ds for ds in pacs.received if ds.Modality == "SR"]
    assert sorted(
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for ds in srs
    ) == sorted(uids)
    for name in expected:  # the results themselves stay in OUT
        assert (settings.out / name).is_file()


def test_images_received_before_a_stop_are_processed_at_the_next_start(predictor: Predictor, tmp_path: Path) -> None:
    settings = NodeSettings(out=tmp_path / "out", port=0)
    source = radiograph(tmp_path / "a.dcm")
    uid = pydicom.dcmread(source).SOPInstanceUID
    settings.incoming.mkdir(parents=True)
    shutil.copy(source, settings.incoming / f"{uid}.dcm")  # as the C-STORE handler leaves it
    with Node(predictor, settings):
        wait_for(lambda: uid in results(settings.out), "the left-over image")
    assert results(settings.out)[uid]["prediction"]["accepted"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--ae-title", "A_TITLE_TOO_LONG_"], "--ae-title 'A_TITLE_TOO_LONG_': an AE title is 1 to 16 printable ASCII characters"),
        (["--ae-title", "BACK\\SLASH"], "an AE title is 1 to 16 printable ASCII characters without a backslash"),
        (["--allow-ae", ""], "--allow-ae '': an AE title"),
        (["--forward", "PACS@host"], "--forward 'PACS@host': expected AE@HOST:PORT"),
        (["--forward", "PACS@host:70000"], "--forward port must be between 1 and 65535, got 70000"),
        (["--queue-size", "0"], "--queue-size"),
    ],
)
def test_cli_checks_options_before_loading_the_model(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["listen", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_cli_refuses_an_out_folder_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    assert main(["listen", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_warns_about_a_public_address_and_names_a_busy_port(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            [
                "listen",
                "--checkpoint",
                str(checkpoint),
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "out"),
                "--host",
                "0.0.0.0",
                "--port",
                str(port),
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "warning: listening on 0.0.0.0, reachable from other machines" in err and "--allow-ae" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err


def test_node_settings_refuse_bad_values(tmp_path: Path) -> None:
    with pytest.raises(CxrdxError, match="queue_size must be at least 1"):
        NodeSettings(out=tmp_path, queue_size=0)
    with pytest.raises(CxrdxError, match="AE title"):
        NodeSettings(out=tmp_path, ae_title="")
    assert Peer.parse("PACS@[::1]:104") == Peer("PACS", "::1", 104)


DCMTK = ("echoscu", "storescu", "storescp", "dcmcjpeg")


@pytest.mark.slow
def test_dcmtk_storescu_to_listen_to_storescp(checkpoint: Path, tmp_path: Path) -> None:
    """dcmtk as the modality (echoscu, storescu) and as the PACS (storescp), cxrdx listen as a process between
    them: one SR per image reaches the PACS, and the patient's name is in no log and no file name."""
    missing = [tool for tool in DCMTK if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"dcmtk not installed: {', '.join(missing)} (Debian: dcmtk; `make dicomtools`)")
    images = tmp_path / "images"
    images.mkdir()
    sources = [radiograph(images / "dx.dcm"), radiograph(images / "cr.dcm", 1, Modality="CR", SOPClassUID=STORAGE_CLASSES[0])]
    subprocess.run(["dcmcjpeg", "+e1", str(sources[1]), str(sources[1])], check=True, capture_output=True)  # JPEG Lossless SV1
    uids = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sources)
    pacs_dir, out = tmp_path / "pacs", tmp_path / "out"
    pacs_dir.mkdir()
    pacs_port, node_port = free_port(), free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "--aetitle", "PACS", "--output-directory", str(pacs_dir), "-v", str(pacs_port)],
        stdout=(logs / "storescp.out").open("w"),
        stderr=subprocess.STDOUT,
    )
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cxrdx",
            "listen",
            "--checkpoint",
            str(checkpoint),
            "--device",
            "cpu",
            "--port",
            str(node_port),
            "--out",
            str(out),
            "--forward",
            f"PACS@127.0.0.1:{pacs_port}",
            "--allow-ae",
            "MODALITY",
        ],
        stdout=(logs / "listen.out").open("w"),
        stderr=(logs / "listen.err").open("w"),
    )
    try:

        def answers() -> bool:
            return (
                subprocess.run(
                    ["echoscu", "-aet", "MODALITY", "-aec", "CXRDX", "-to", "5", "127.0.0.1", str(node_port)],
                    check=False,
                    capture_output=True,
                ).returncode
                == 0
            )

        wait_for(answers, "cxrdx listen to answer C-ECHO", timeout=120)
        for path, proposal in zip(sources, ([], ["-xs"])):  # -xs: propose JPEG Lossless SV1 too, for the compressed file
            sent = subprocess.run(
                ["storescu", *proposal, "-aet", "MODALITY", "-aec", "CXRDX", "-to", "30", "127.0.0.1", str(node_port), str(path)],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert sent.returncode == 0 and not sent.stderr.strip(), sent.stderr
        wait_for(lambda: len(list(pacs_dir.iterdir())) == len(sources), "one SR per image at the PACS")
    finally:
        node.send_signal(signal.SIGINT)
        code = node.wait(timeout=60)
        pacs.terminate()
        pacs.wait(timeout=30)
    assert code == 0
    delivered = [pydicom.dcmread(p) for p in pacs_dir.iterdir()]
    assert all(ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" for ds in delivered)
    references = sorted(
        ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for ds in delivered
    )
    assert references == uids
    assert not list((out / "outbox").iterdir())
    log = (logs / "listen.out").read_text() + (logs / "listen.err").read_text()
    assert all(uid in log for uid in uids)  # the log names images by SOP Instance UID ...
    for secret in (PATIENT, "DOE", "JANE", PATIENT_ID):  # ... and never by patient
        assert secret not in log
        assert not [p for p in out.rglob("*") if secret in p.name]
