"""Score one uploaded file with a bundle: read in memory, the network's view, probabilities,
their place in the validation distribution, and (on request) Grad-CAM maps.

Scoring uses ONNX Runtime when the bundle has `model.onnx` (PyTorch otherwise), through
`Bundle.probabilities`, so the figures equal `stagewise predict`'s. Grad-CAM needs PyTorch's
gradients: it runs on a private copy of the network under a lock, because pytorch-grad-cam
hooks the target layer for the length of a call and two concurrent calls (or a concurrent
scoring pass) on one module would mix their activations.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stagewise.data.readers import ImageReadError, read_image_bytes
from stagewise.bundle import VALIDATION_FILE, Bundle
from stagewise.serve.refusals import read_problem, wrong_kind

# DICOM elements read to describe a file to the person who sent it: how it was displayed and
# scored, nothing that identifies anyone. Only these tags are parsed (pydicom specific_tags).
_DICOM_TAGS = ["PhotometricInterpretation", "NumberOfFrames", "Modality", "ViewPosition", "WindowCenter",
               "WindowWidth", "VOILUTSequence", "RescaleSlope", "RescaleIntercept", "BitsStored", "SamplesPerPixel"]


@dataclass
class Scored:
    probabilities: np.ndarray  # (outputs,)
    view: np.ndarray  # what the network saw, 2D (a 3D volume: its middle axial slice)
    source: dict
    tensor: torch.Tensor = field(repr=False)  # (1, ...) network input


class _OutputLogit(torch.nn.Module):
    """One output's logit, as (N, 1), for Grad-CAM (saliency.gradcam reads `.backbone`)."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module, column: int):
        super().__init__()
        self.backbone, self.head, self.column = backbone, head, column

    def forward(self, x):
        return self.head(self.backbone(x))[:, self.column : self.column + 1]


class Scorer:
    def __init__(self, bundle: Bundle, engine: str = "auto"):
        if engine not in ("auto", "onnx", "torch"):
            raise ValueError(f"engine {engine!r}: choose auto, onnx or torch")
        has_onnx = (bundle.path / "model.onnx").is_file()
        if engine == "onnx" and not has_onnx:
            raise ValueError(f"{bundle.path} has no model.onnx; use --engine torch")
        self.bundle = bundle
        self.engine = "onnx" if engine == "onnx" or (engine == "auto" and has_onnx) else "torch"
        self.tasks = bundle.info["tasks"]
        self._session = _onnx_session(bundle.path / "model.onnx") if self.engine == "onnx" else None
        self.validation = _load_validation(bundle.path)
        self._cam_lock = threading.Lock()
        self._cam_nets: list[torch.nn.Module] | None = None
        # sorted out-of-fold probabilities per output, for the percentile of a new one
        self._oof = {}
        for t in self.tasks:
            v = (self.validation or {}).get("outputs", {}).get(t["output"])
            if v and v["n"]:
                p, y = np.asarray(v["probability"], float), np.asarray(v["label"], int)
                self._oof[t["output"]] = (np.sort(p), np.sort(p[y == 1]), np.sort(p[y == 0]))

    def warm_up(self) -> None:
        """One pass (and one Grad-CAM) on a blank image, so that the first real request pays
        neither for the runtime's start nor for importing pytorch-grad-cam (seconds)."""
        size = self.bundle.info["image_size"]
        x = torch.zeros(1, 1, *([size] * self.bundle.spatial_dims))
        self.probabilities(x)
        if self.bundle.spatial_dims == 2:
            self.saliency(Scored(np.zeros(0), x[0, 0].numpy(), {}, x))

    # -- reading ---------------------------------------------------------------------------
    def read(self, data: bytes, name: str) -> Scored:
        source = describe(data, name)
        try:  # the reader refuses a multi-frame DICOM and an image over the pixel limit, as for `predict`
            img = read_image_bytes(data, name)
            if img.ndim != self.bundle.spatial_dims:
                raise wrong_kind(img.ndim, self.bundle.spatial_dims)
            x = self.bundle.prepare(img, name)
        except ImageReadError as err:
            raise read_problem(err) from None
        source["height"], source["width"] = int(img.shape[-2]), int(img.shape[-1])
        if img.ndim == 3:
            source["depth"] = int(img.shape[0])
        view = x[0].numpy()
        if view.ndim == 3:
            view = view[view.shape[0] // 2]
        return Scored(np.zeros(0), view, source, x.unsqueeze(0))

    # -- scoring ---------------------------------------------------------------------------
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """(N, outputs), as `Bundle.probabilities` computes them (the same graph or module)."""
        if self._session is not None:
            return self.bundle.calibrate(self._session.run(None, {"image": x.numpy()})[0])
        return self.bundle.probabilities(x, "torch")

    def score(self, scored: Scored) -> Scored:
        scored.probabilities = np.asarray(self.probabilities(scored.tensor))[0].astype(np.float64)
        return scored

    def outputs(self, probabilities: np.ndarray) -> list[dict]:
        out = []
        for t, p in zip(self.tasks, probabilities):
            p = float(p)
            out.append({
                "output": t["output"], "outcome": t["outcome"], "probability": p, "threshold": float(t["threshold"]),
                "decision": bool(p >= t["threshold"]), "validation": self.position(t["output"], p),
            })
        return out

    def position(self, output: str, p: float) -> dict | None:
        """Where p sits among the output's out-of-fold probabilities: the share below it,
        overall and among images with and without the outcome (ties count half)."""
        if output not in self._oof:
            return None
        every, pos, neg = self._oof[output]

        def below(a):
            if not len(a):
                return None
            return float((np.searchsorted(a, p, "left") + np.searchsorted(a, p, "right")) / 2 / len(a))

        return {"below": below(every), "below_with_outcome": below(pos), "below_without_outcome": below(neg),
                "n": len(every), "n_with_outcome": len(pos), "n_without_outcome": len(neg)}

    # -- Grad-CAM ---------------------------------------------------------------------------
    def saliency(self, scored: Scored) -> list[np.ndarray | None]:
        """One Grad-CAM map in [0, 1] per output (None where the backbone has no spatial last group)."""
        from stagewise.evaluation.saliency import gradcam

        with self._cam_lock:
            if self._cam_nets is None:
                model = copy.deepcopy(self.bundle.model).float().eval()
                model.requires_grad_(False)  # gradients flow to the input only
                nets, columns = [], {}
                for t in self.tasks:
                    j = columns[t["arm"]] = columns.get(t["arm"], -1) + 1
                    nets.append(_OutputLogit(model.backbone, model.heads[t["arm"]], j))
                self._cam_nets = nets
            maps = []
            for net in self._cam_nets:
                cam = gradcam(net, scored.tensor.clone())
                maps.append(None if cam is None else np.asarray(cam[0], dtype=np.float32))
            return maps


def describe(data: bytes, name: str) -> dict:
    """Format and display facts of an upload, for the page: never an identifying header value."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return {"format": "PNG"}
    if data[:3] == b"\xff\xd8\xff":
        return {"format": "JPEG"}
    if data[128:132] == b"DICM" or name.endswith((".dcm", ".dicom")) or data[:2] in (b"\x02\x00", b"\x08\x00"):
        return _describe_dicom(data)
    if name.endswith((".nii", ".nii.gz")) or data[:2] == b"\x1f\x8b" or data[344:348] == b"n+1\x00":
        return {"format": "NIfTI"}
    return {"format": "other"}


MODALITIES = frozenset("CR DX CT MR MG US PT NM XA RF OT SC".split())
"""DICOM Modality terms (PS3.3 C.7.3.1.1.1) of the images a bundle may score."""
VIEW_POSITIONS = frozenset("AP PA LL RL LLD RLD LLO RLO LATERAL LAT CC MLO ML LM LMO FB SIO XCC XCCL XCCM AXIAL "
                           "SAGITTAL CORONAL".split())
"""Radiographic view terms (DICOM ViewPosition and mammography views): the tags are free text
that a sender may fill with anything, a patient's name included."""


def vocabulary_term(value: str, terms: frozenset[str]) -> str:
    """`value` when it is one of `terms` (case and spaces aside), else "other": a free-text
    DICOM tag is never echoed back as written."""
    term = value.strip().upper()
    return term if term in terms else "other"


def _describe_dicom(data: bytes) -> dict:
    import pydicom

    out: dict = {"format": "DICOM", "notes": []}
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
        photometric = str(ds.get("PhotometricInterpretation", "")).strip()
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        modality = str(ds.get("Modality", "")).strip()
        view = str(ds.get("ViewPosition", "")).strip()
        windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
    except Exception:  # a damaged header: the reader will say what is wrong
        return out
    out["frames"] = frames
    if modality:
        out["modality"] = vocabulary_term(modality, MODALITIES)
    if view:
        out["view_position"] = vocabulary_term(view, VIEW_POSITIONS)
    if photometric == "MONOCHROME1":
        out["notes"].append("stored inverted (MONOCHROME1): shown here with dense structures bright")
    out["notes"].append("the window stored in the file was applied" if windowed
                        else "no window in the file: scaled by its stored bit depth (BitsStored)")
    return out


def _onnx_session(path: Path):
    """An ONNX Runtime session whose idle threads sleep instead of spinning: spinning threads
    would take the cores from the PyTorch Grad-CAM pass that follows a score on /explain
    (measured: ONNX + PyTorch back to back 80 ms with spinning, 38 ms without, ResNet-18 224 px)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _load_validation(path: Path) -> dict | None:
    file = path / VALIDATION_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def png_data_url(gray: np.ndarray) -> str:
    """A [0, 1] gray array as a PNG data URL (encoded in memory)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_data_url(cam: np.ndarray) -> str:
    """A [0, 1] Grad-CAM map as a transparent RGBA PNG data URL: jet colours, weak areas clear."""
    from matplotlib import colormaps
    from PIL import Image

    cam = np.clip(np.nan_to_num(cam), 0, 1)
    rgba = colormaps["jet"](cam)
    rgba[..., 3] = np.clip(cam * 1.4, 0, 1) * 0.75
    buf = io.BytesIO()
    Image.fromarray(np.round(rgba * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
