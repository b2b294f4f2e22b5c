"""`cxrdx listen`: a DICOM node (pynetdicom) that predicts every chest radiograph a PACS or modality sends it.

The node answers C-ECHO and accepts C-STORE of CR and DX images in every transfer syntax cxrdx decodes. The
C-STORE handler only checks the request, writes the dataset atomically to `OUT/incoming/` and queues it; a
full queue answers 0xA700 (Refused: Out of Resources). One worker thread runs the header rules and the model
on each queued image and writes into `OUT`: `<SOP Instance UID>.json` (the prediction), the Structured Report
`<uid>.sr.dcm` and, with heatmaps, `<uid>.heatmap.dcm`. With a forward peer the results are copied into
`OUT/outbox/` and sent from there by C-STORE; a file leaves the outbox only once the peer stored it, so what
could not be sent waits there for the next try (at start, and every `outbox_retry_s`). Images received but not
yet processed when the node stopped stay in `OUT/incoming/` and are processed at the next start.

Logs name images by SOP Instance UID and peers by AE title and address: never a patient's name or ID.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from cxrdx.atomic import atomic_path, write_text
from cxrdx.errors import CxrdxError

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from cxrdx.predict import Prediction, Predictor

log = logging.getLogger("cxrdx.listen")

# SOP classes the node stores: the radiographs cxrdx reads (the header rules refuse other modalities anyway).
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
)
# Every transfer syntax the installed decoders read (pydicom + pylibjpeg's libjpeg, openjpeg and RLE plugins).
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (processes 2 and 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)
VERIFICATION = "1.2.840.10008.1.1"
RESULT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage (cxrdx.dicom_sr)
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage (cxrdx.dicom_sc)
)
RESULT_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # what the result files are written in, and implicit

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources" (PS3.4 Annex B.2.3)
DOES_NOT_MATCH = 0xA900  # C-STORE "Error: Data Set does not match SOP Class"
CANNOT_UNDERSTAND = 0xC000  # C-STORE "Error: Cannot understand"
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII but the backslash, at most 16 characters
TIMEOUT_S = 30.0  # association, DIMSE and network timeouts: a stalled peer frees its thread


def check_ae_title(title: str, what: str) -> str:
    """`title` if it is a valid AE title (1-16 printable ASCII characters, no backslash, not only spaces)."""
    if not AE_TITLE.fullmatch(title) or not title.strip():
        raise CxrdxError(f"{what} {title!r}: an AE title is 1 to 16 printable ASCII characters without a backslash")
    return title


def check_port(port: int, what: str) -> int:
    if not 1 <= port <= 65535:
        raise CxrdxError(f"{what} must be between 1 and 65535, got {port}")
    return port


@dataclass(frozen=True)
class Peer:
    """A DICOM node to send results to: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str, what: str = "--forward") -> Peer:
        """`AE@HOST:PORT`, e.g. `PACS@10.0.0.5:104` (an IPv6 host in brackets: `PACS@[::1]:104`)."""
        match = re.fullmatch(r"([^@]+)@(\[[0-9a-fA-F:.]+\]|[^:\[\]@]+):([0-9]{1,5})", spec)
        if not match:
            raise CxrdxError(f"{what} {spec!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        title, host, port = match.groups()
        return cls(check_ae_title(title, what), host.strip("[]"), check_port(int(port), f"{what} port"))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NodeSettings:
    """Where the node listens, what it writes and where it forwards; `port` 0 takes a free port."""

    out: Path
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "CXRDX"
    allow_ae: tuple[str, ...] = ()  # calling AE titles allowed to associate; empty: any
    forward: Peer | None = None
    heatmaps: bool = False
    queue_size: int = 16
    send_attempts: int = 3
    retry_delay_s: float = 2.0
    outbox_retry_s: float = 60.0

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title, "AE title")
        for title in self.allow_ae:
            check_ae_title(title, "allowed AE title")
        if not 0 <= self.port <= 65535:
            raise CxrdxError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("queue_size", "send_attempts"):
            if getattr(self, name) < 1:
                raise CxrdxError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("retry_delay_s", "outbox_retry_s"):
            if getattr(self, name) < 0:
                raise CxrdxError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def incoming(self) -> Path:
        return Path(self.out) / "incoming"

    @property
    def outbox(self) -> Path:
        return Path(self.out) / "outbox"


@dataclass(frozen=True)
class NodeResult:
    """What the node wrote for one received image (its `<uid>.json`)."""

    sop_instance_uid: str
    prediction: Prediction
    outputs: list[str] = field(default_factory=list)  # result files in OUT, by name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def send_files(peer: Peer, paths: Sequence[Path], ae_title: str) -> list[Path]:
    """C-STORE each DICOM file to `peer` over one association; the files the peer stored (status Success or
    a Warning). Raises ConnectionError when no association could be made or it broke off."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    for sop_class in RESULT_CLASSES:
        ae.add_requested_context(sop_class, list(RESULT_SYNTAXES))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {peer}")
    stored = []
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if not status:  # an empty status: the association was aborted or timed out
                raise ConnectionError(f"{peer} stopped answering")
            code = int(status.Status)
            if code == SUCCESS or 0xB000 <= code <= 0xBFFF:
                stored.append(path)
            else:
                log.warning("%s refused %s with status 0x%04X; it stays in the outbox", peer, path.name, code)
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


class Node:
    """The DICOM node: `start()` serves in background threads, `stop()` ends the server, lets the worker
    finish the queued images and returns. Also a context manager."""

    def __init__(self, predictor: Predictor, settings: NodeSettings):
        self.predictor = predictor
        self.settings = settings
        self.jobs: queue.Queue[Path | None] = queue.Queue(maxsize=settings.queue_size)
        self._server: ThreadedAssociationServer | None = None
        self._worker: threading.Thread | None = None
        self._peer_down = False  # the last send failed: new results wait in the outbox for the periodic retry

    @property
    def port(self) -> int:
        """The port the server listens on (the one taken when the settings asked for 0)."""
        if self._server is None:
            raise CxrdxError("the node is not started")
        return int(self._server.server_address[1])

    def start(self) -> Self:
        from pynetdicom import AE, evt

        s = self.settings
        s.incoming.mkdir(parents=True, exist_ok=True)
        if s.forward:
            s.outbox.mkdir(parents=True, exist_ok=True)
        backlog = sorted(s.incoming.glob("*.dcm"))  # received before an earlier stop, not yet processed
        ae = AE(ae_title=s.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.require_calling_aet = list(s.allow_ae)
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers: list[Any] = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected)]
        self._worker = threading.Thread(target=self._work, args=(backlog,), name="cxrdx-listen-worker", daemon=True)
        self._worker.start()
        try:
            self._server = ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self.jobs.put(None)
            self._worker.join()
            raise CxrdxError(f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc}") from None
        log.info("listening as %s on %s:%d%s", s.ae_title, s.host, self.port, f", forwarding results to {s.forward}" if s.forward else "")
        if backlog:
            log.info("%d image(s) received before the last stop are processed first", len(backlog))
        return self

    def stop(self) -> None:
        """Refuse new associations, finish the images already accepted, stop the worker."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self.jobs.put(None)
            self._worker.join()
            self._worker = None
            log.info("stopped")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- network threads: check, store, queue ----------------------------------------------------
    def _on_echo(self, event: Event) -> int:
        log.info("C-ECHO from %s", _caller(event))
        return SUCCESS

    def _on_rejected(self, event: Event) -> None:
        log.warning("association from %s rejected (calling AE title not allowed, or nothing to negotiate)", _caller(event))

    def _on_store(self, event: Event) -> int:
        request = cast("C_STORE", event.request)
        uid = str(request.AffectedSOPInstanceUID or "")
        if not UID.fullmatch(uid) or len(uid) > 64:
            log.warning("C-STORE from %s refused: invalid SOP Instance UID", _caller(event))
            return CANNOT_UNDERSTAND
        try:
            ds = event.dataset
            if str(ds.SOPInstanceUID) != uid or str(ds.SOPClassUID) != str(request.AffectedSOPClassUID):
                log.warning(
                    "C-STORE %s from %s refused: the dataset's SOP class or instance UID differs from the request's", uid, _caller(event)
                )
                return DOES_NOT_MATCH
        except Exception as exc:  # noqa: BLE001 (a dataset pydicom cannot parse is the sender's problem: answered, not raised)
            log.warning("C-STORE %s from %s refused: unreadable dataset (%s)", uid, _caller(event), type(exc).__name__)
            return CANNOT_UNDERSTAND
        path = self.settings.incoming / f"{uid}.dcm"
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(event.encoded_dataset())  # as received: the decoder reads the sender's syntax
        except OSError as exc:
            log.error("C-STORE %s refused: cannot write %s (%s)", uid, path.parent, exc.strerror or type(exc).__name__)
            return OUT_OF_RESOURCES
        try:
            self.jobs.put_nowait(path)
        except queue.Full:
            path.unlink(missing_ok=True)
            log.warning("C-STORE %s from %s refused: the queue is full (%d images)", uid, _caller(event), self.settings.queue_size)
            return OUT_OF_RESOURCES
        log.info("received %s from %s", uid, _caller(event))
        return SUCCESS

    # --- the worker thread: predict, write, forward ------------------------------------------------
    def _work(self, backlog: list[Path]) -> None:
        for left_over in backlog:
            self._process(left_over)
        self._retry_outbox()
        next_retry = time.monotonic() + self.settings.outbox_retry_s
        while True:
            try:
                path = self.jobs.get(timeout=max(0.0, next_retry - time.monotonic()) if self.settings.forward else None)
                if path is None:
                    return
                self._process(path)
            except queue.Empty:
                pass
            if self.settings.forward and time.monotonic() >= next_retry:
                self._retry_outbox()
                next_retry = time.monotonic() + self.settings.outbox_retry_s

    def _process(self, path: Path) -> None:
        """One received image → its JSON, SR (and heatmap) in OUT, forwarded; the incoming file removed.
        No error ends the worker: it is logged by UID and written into the image's JSON."""
        uid = path.stem
        try:
            result = self.predict(path)
        except Exception as exc:  # noqa: BLE001 (the node keeps serving whatever one file does)
            from cxrdx.predict import Prediction

            # only the exception's class: a message quoting header values could carry the patient's name
            log.error("%s: failed (%s); the details are in %s.json", uid, type(exc).__name__, uid)
            result = NodeResult(uid, Prediction(name=uid, error=f"{type(exc).__name__}: {exc}"))
        try:
            write_text(Path(self.settings.out) / f"{uid}.json", json.dumps(result.to_dict(), indent=2) + "\n")
            if self.settings.forward and result.outputs:
                self._forward([Path(self.settings.out) / name for name in result.outputs])
        except OSError as exc:
            log.error("%s: cannot write its results (%s); the received file stays in %s", uid, exc.strerror or exc, path.parent)
            return
        path.unlink(missing_ok=True)

    def predict(self, path: Path) -> NodeResult:
        """Predict one received file and write its SR (and heatmap) into OUT."""
        from cxrdx.dicom_sc import write_heatmaps
        from cxrdx.dicom_sr import write_srs

        uid, out = path.stem, Path(self.settings.out)
        [prediction] = self.predictor.predict([path], names=[uid], errors="report")
        outputs = [p.name for p in write_srs([path], [prediction], self.predictor.info, out)]
        if self.settings.heatmaps:
            heatmaps = write_heatmaps(self.predictor, [path], [prediction], out)
            outputs += [p.name for p in heatmaps.written]
            for _, why in heatmaps.skipped:
                log.info("%s: no heatmap: %s", uid, why)
        if prediction.error:
            log.warning("%s: could not be read: %s", uid, prediction.error)
        elif not prediction.accepted:
            log.info("%s: refused: %s", uid, prediction.reason)
        else:
            log.info("%s: positive findings: %s", uid, ", ".join(prediction.positives) or "none")
        return NodeResult(uid, prediction, outputs)

    def _forward(self, paths: list[Path]) -> None:
        """Put the result files in the outbox, then send the outbox unless the peer failed last time."""
        for path in paths:
            with atomic_path(self.settings.outbox / path.name) as tmp:
                shutil.copyfile(path, tmp)
        if not self._peer_down:
            self._retry_outbox()

    def _retry_outbox(self) -> None:
        """Send what waits in the outbox, `send_attempts` tries `retry_delay_s` apart; sent files leave it."""
        peer = self.settings.forward
        if peer is None:
            return
        for attempt in range(1, self.settings.send_attempts + 1):
            waiting = sorted(self.settings.outbox.glob("*.dcm"))
            if not waiting:
                self._peer_down = False
                return
            try:
                sent = send_files(peer, waiting, self.settings.ae_title)
            except Exception as exc:  # noqa: BLE001 (unreachable, refused, cut off: the files stay for the next try)
                reason = exc if isinstance(exc, (ConnectionError, OSError)) else type(exc).__name__
                log.warning("sending %d file(s) to %s, try %d of %d: %s", len(waiting), peer, attempt, self.settings.send_attempts, reason)
                if attempt < self.settings.send_attempts:
                    time.sleep(self.settings.retry_delay_s)
                continue
            for path in sent:
                path.unlink(missing_ok=True)
                log.info("sent %s to %s", path.name, peer)
            self._peer_down = False
            return
        self._peer_down = True
        log.warning(
            "%s unreachable: %d file(s) wait in %s for the next try",
            peer,
            len(list(self.settings.outbox.glob("*.dcm"))),
            self.settings.outbox,
        )


def _caller(event: Event) -> str:
    """The calling AE title and address of an event's association: never anything from a dataset."""
    requestor = event.assoc.requestor
    return f"{requestor.ae_title.strip() or '?'}@{requestor.address}"
