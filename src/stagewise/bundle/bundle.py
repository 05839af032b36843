"""A bundle read back for use: the network, its preprocessing and thresholds (`Bundle`), and
scoring image files with it (PyTorch or ONNX Runtime), with each output's recorded
recalibration applied. `predict`, `evaluate` and `serve` all score through this class."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stagewise.bundle.integrity import BundleError, verify
from stagewise.bundle.network import SharedHeads, load_heads
from stagewise.bundle.schema import check_onnx, check_outputs, read_info
from stagewise.data import ImageReadError, read_image
from stagewise.data.preprocess import to_cube, to_square
from stagewise.data.readers import INTENSITY_CONVENTION
from stagewise.errors import RunError, StagewiseError
from stagewise.evaluation.calibration import apply_recalibration
from stagewise.models import create_backbone


@dataclass
class Bundle:
    path: Path
    info: dict
    model: SharedHeads
    _onnx: object = field(default=None, repr=False)
    integrity_notice: str | None = None  # set by `load` for a bundle that records no digests

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Read a bundle (safetensors only: nothing is unpickled) after checking it whole:
        bundle.json against its schema, every file against the digests recorded at export
        (`integrity.verify`), the tasks against the heads' outputs and the ONNX graph's input
        size. Any problem is a BundleError naming the file and what to do; a bundle exported
        before digests were recorded loads with a notice (`integrity_notice`)."""
        path = Path(path)
        if not (path / "bundle.json").is_file():
            raise RunError(f"{path}: not a stagewise bundle (no bundle.json); make one with `stagewise export`")
        info = read_info(path)
        notice = verify(path, info, ("backbone.safetensors", "heads.safetensors"))
        backbone = _load_part(path / "backbone.safetensors", lambda f: create_backbone(f"file:{f}"))
        heads = _load_part(path / "heads.safetensors", load_heads)
        check_outputs(path, info, heads)
        check_onnx(path, info)
        bundle = cls(path, info, SharedHeads(backbone, heads).float().eval())
        bundle.integrity_notice = notice
        return bundle

    @property
    def notices(self) -> list[str]:
        """Every sentence a user of this bundle should read before its scores: an older
        bundle's unchecked files or intensity convention, and each recalibrated output."""
        said = [n for n in (self.integrity_notice, self.intensity_notice) if n]
        for t in self.info["tasks"]:
            r = t.get("recalibration")
            if r:
                said.append(f"output {t['output']}: its probabilities pass through the recalibration recorded in the "
                            f"bundle, p' = sigmoid({r['intercept']:.4f} + {r['slope']:.4f} logit p)")
        return said

    @property
    def intensity_notice(self) -> str | None:
        """A plain sentence when the bundle was made under another intensity convention than the
        one this stagewise reads images with (`stagewise.data.readers`), else None. Such a bundle
        still loads and scores: its DICOM inputs may now reach the network on another scale
        than in its training, so its probabilities can differ from those it was validated with."""
        made = (self.info.get("intensity") or {}).get("convention")
        if made == INTENSITY_CONVENTION:
            return None
        how = (f"the {made} intensity convention" if made else
               "the earlier intensity convention (DICOM scaled by each image's own minimum and maximum)")
        return (f"This bundle was made with {how}; this stagewise reads images by {INTENSITY_CONVENTION} (integer "
                "pixels over their stored bit depth), so its probabilities for DICOM files can differ from those it "
                "was validated with: export it again from its run to match.")

    @property
    def spatial_dims(self) -> int:
        return self.model.backbone.spatial_dims

    def read(self, file: str | Path) -> torch.Tensor:
        """One file as the network sees it: (1, size, size) or (1, size, size, size) in
        [0, 1], after the reader's rescaling/windowing and the bundle's resizing. A file that
        cannot be read, or of the wrong kind, raises ImageReadError naming the file."""
        return self.prepare(read_image(file), file)

    def prepare(self, img: np.ndarray, file: str | Path) -> torch.Tensor:
        """A decoded image (`read_image` or `read_image_bytes`) as the network sees it; see
        `read`. `file` names the image in the error for data of the wrong kind."""
        if img.ndim != self.spatial_dims:
            kind = {2: "a 2D image", 3: "a 3D volume"}
            raise ImageReadError(file, f"{kind.get(img.ndim, f'{img.ndim}-D data')}; this bundle scores "
                                       f"{kind[self.spatial_dims]}s")
        size, resize = self.info["image_size"], self.info["resize"]
        arr = to_square(img, size, resize) if img.ndim == 2 else to_cube(img, size, resize)
        # float16 as in training (load_images), then float32 for the network
        return torch.from_numpy(arr).to(torch.float16).float().unsqueeze(0)

    def images(self, files: list[str | Path]) -> torch.Tensor:
        """Every file read (see `read`); the first unreadable one raises."""
        return torch.stack([self.read(f) for f in files])

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, engine: str = "torch") -> np.ndarray:
        """(N, outputs) probabilities for a batch of read images."""
        if engine == "onnx":
            if self._onnx is None:
                import onnxruntime as ort

                self._onnx = ort.InferenceSession(str(self.path / "model.onnx"), providers=["CPUExecutionProvider"])
            return self.calibrate(self._onnx.run(None, {"image": x.numpy()})[0])
        return self.calibrate(self.model(x).numpy())

    def calibrate(self, prob: np.ndarray) -> np.ndarray:
        """The network's (N, outputs) probabilities with each output's recorded logistic
        recalibration applied (`stagewise evaluate --recalibrate`); unchanged without one."""
        out = np.array(prob, copy=True)
        for j, task in enumerate(self.info["tasks"]):
            r = task.get("recalibration")
            if r:
                out[:, j] = apply_recalibration(out[:, j], r["intercept"], r["slope"]).astype(out.dtype)
        return out

    def predict(self, files: list[str | Path], engine: str = "torch") -> pd.DataFrame:
        """Per file: a probability and a decision per output (the backbone run once), or,
        for a file that cannot be scored, the reason in `error` (the others are still scored)."""
        if engine not in ("torch", "onnx"):
            raise RunError(f"engine {engine!r}: choose torch or onnx")
        rows, errors = [], []
        for f in files:
            try:
                rows.append(self.read(f))
                errors.append(None)
            except ImageReadError as err:
                rows.append(None)
                errors.append(err.reason)
        ok = [i for i, r in enumerate(rows) if r is not None]
        prob = np.full((len(files), len(self.info["tasks"])), np.nan)
        if ok:
            prob[ok] = self.probabilities(torch.stack([rows[i] for i in ok]), engine)
        table = pd.DataFrame({"image": [str(f) for f in files]})
        for j, task in enumerate(self.info["tasks"]):
            table[f"probability:{task['output']}"] = prob[:, j].astype(np.float64)
            decision = pd.array(np.where(np.isnan(prob[:, j]), 0, prob[:, j] >= task["threshold"]), dtype="Int64")
            decision[np.isnan(prob[:, j])] = pd.NA
            table[f"decision:{task['output']}"] = decision
        table["error"] = errors
        return table


def _load_part(file: Path, load):
    """`load(file)`, a weights file of the bundle; anything unreadable is a BundleError naming it."""
    if not file.is_file():
        raise BundleError(f"{file} is missing: the bundle is incomplete; copy the whole bundle folder again or export it "
                          "again from its run")
    try:
        return load(file)
    except Exception as err:  # safetensors' own errors, a foreign header, shapes that do not fit
        why = str(err) if isinstance(err, StagewiseError) else type(err).__name__
        raise BundleError(f"{file} is not a readable bundle weights file ({why}); copy the whole bundle folder again or "
                          "export it again from its run") from None
