"""A trained model outside the study: save/load networks, export bundles, predict on files.

A bundle is a folder a site can copy to a bedside machine: `model.safetensors` (weights and
the metadata to rebuild the network), `model.onnx`, `bundle.json` (preprocessing, decision
threshold, metrics, provenance), the study's `recipe.yaml` and a short `MODEL_CARD.md`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from stagewise import __version__
from stagewise.models import Network, build_arch
from stagewise.recipe import HeadConfig, Recipe, recipe_from_dict
from stagewise.runs import RunError


def save_network(net: Network, path: str | Path, head: HeadConfig) -> Path:
    """Whole network (backbone + head) as safetensors, with what `load_network` needs."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {
        "stagewise_arch": net.backbone.arch,
        "head": head.model_dump_json(),
        "n_outputs": str(net.head.layers[-1].out_features),
    }
    save_file(state, str(path), metadata=meta)
    return path


def load_network(path: str | Path) -> Network:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no saved model")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "stagewise_arch" not in meta or "head" not in meta:
        raise RunError(f"{path}: not a network saved by stagewise (metadata missing)")
    net = Network.build(build_arch(meta["stagewise_arch"]), HeadConfig.model_validate_json(meta["head"]), int(meta["n_outputs"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


class _Probabilities(torch.nn.Module):
    """[0, 1] one-channel images in, probabilities out: the whole bedside computation."""

    def __init__(self, net: Network):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x))


def export_onnx(net: Network, path: Path, image_size: int) -> Path:
    example = torch.rand(2, 1, image_size, image_size)
    model = _Probabilities(net.float().to(memory_format=torch.contiguous_format)).eval()
    torch.onnx.export(
        model, (example,), str(path), input_names=["image"], output_names=["probability"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
    )
    return path


def _model_card(info: dict) -> str:
    s = info["metrics"]
    lines = [
        f"# {info['recipe']} / {info['arm']}",
        "",
        f"- Backbone: `{info['backbone']}`; stages: {' -> '.join(info['stages'])}",
        f"- Trained on: {info['source']}",
        f"- Input: one-channel image, resized ({info['resize']}) to {info['image_size']} px, intensities in [0, 1]",
        f"- Output: probability of the positive outcome; decision threshold {info['threshold']:.4f} "
        "(chosen on training data, never on test data)",
        f"- Cross-validated performance of this arm ({info['n_folds']} folds): AUROC "
        f"{s['auroc']['mean']:.3f} ± {s['auroc']['sd']:.3f}, balanced accuracy "
        f"{s['balanced_accuracy']['mean']:.3f} ± {s['balanced_accuracy']['sd']:.3f}, F1 {s['f1']['mean']:.3f} ± {s['f1']['sd']:.3f}",
        f"- stagewise {info['stagewise']}",
        "",
        "Research use only. Validate on local data before any clinical use; the cross-validated figures",
        "describe the development cohort, not another site.",
    ]
    return "\n".join(lines) + "\n"


def export_bundle(run_dir: str | Path, arm: str, out: str | Path, fold: str | None = None, refit: bool = False) -> Path:
    """Bundle one arm's model: a saved fold model (`fold`, e.g. r0-f0) or a refit on every image."""
    run_dir, out = Path(run_dir), Path(out)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{run_dir}: no metrics.json; finish the study first")
    metrics = json.loads(metrics_path.read_text())
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()), source=str(run_dir / "recipe.yaml"))
    arms = {a.name: a for a in recipe.arms}
    if arm not in arms:
        raise RunError(f"{run_dir}: no model arm {arm!r}; arms: {sorted(arms)}")
    unit = metrics["arms"][arm]
    if refit == (fold is not None):
        raise RunError("choose exactly one of --fold (a saved fold model) and --refit (train on every image)")
    if refit:
        net, threshold = _refit(recipe, arm, unit)
        source = "every image of the cohort (refit after cross-validation)"
    else:
        model_path = run_dir / "folds" / arm / f"{fold}.safetensors"
        if not model_path.is_file():
            raise RunError(f"{model_path} does not exist: set `compute.save_models: true` and run the arm again, or use --refit")
        net = load_network(model_path)
        fold_meta = json.loads((run_dir / "folds" / arm / f"{fold}.json").read_text())
        threshold = fold_meta["metrics"]["threshold"]
        source = f"the training part of fold {fold}"
    out.mkdir(parents=True, exist_ok=True)
    save_network(net, out / "model.safetensors", arms[arm].head)
    export_onnx(net, out / "model.onnx", recipe.data.image_size)
    shutil.copy(run_dir / "recipe.yaml", out / "recipe.yaml")
    info = {
        "stagewise": __version__, "recipe": recipe.name, "arm": arm, "backbone": arms[arm].backbone.name,
        "stages": [s.kind for s in arms[arm].stages], "image_size": recipe.data.image_size,
        "resize": recipe.data.resize, "threshold": threshold, "source": source,
        "precision": recipe.compute.precision, "metrics": unit["summary"], "n_folds": len(unit["folds"]),
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    (out / "MODEL_CARD.md").write_text(_model_card(info))
    return out


def _refit(recipe: Recipe, arm_name: str, unit: dict) -> tuple[Network, float]:
    """Train the arm on every image; the threshold is the median of its fold thresholds,
    each chosen on a training part, since no data is left to choose one on."""
    from stagewise.study import _Silent, _Study, train_fold

    study = _Study(recipe, None, _Silent())
    arm = next(a for a in recipe.arms if a.name == arm_name)
    everything = np.arange(study.cohort.n_images)
    net, _ = train_fold(arm, study.pristine(arm), study.images, study.targets, everything,
                        recipe.seed, study.compute, study.cache, _Silent())
    return net.cpu(), float(np.median([f["threshold"] for f in unit["folds"]]))


@dataclass
class Bundle:
    path: Path
    info: dict
    net: Network

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        if not (path / "bundle.json").is_file():
            raise RunError(f"{path}: not a stagewise bundle (no bundle.json); make one with `stagewise export`")
        return cls(path, json.loads((path / "bundle.json").read_text()), load_network(path / "model.safetensors"))

    def images(self, files: list[str | Path]) -> torch.Tensor:
        from stagewise.data import load_images

        return load_images([str(f) for f in files], self.info["image_size"], self.info["resize"])

    @torch.no_grad()
    def predict(self, files: list[str | Path], engine: str = "torch") -> pd.DataFrame:
        """Probability and decision per image, from PyTorch (float32) or ONNX Runtime."""
        if engine not in ("torch", "onnx"):
            raise RunError(f"engine {engine!r}: choose torch or onnx")
        x = self.images(files).float()
        if engine == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(self.path / "model.onnx"), providers=["CPUExecutionProvider"])
            prob = session.run(None, {"image": x.numpy()})[0][:, 0]
        else:
            prob = torch.sigmoid(self.net.float()(x))[:, 0].numpy()
        return pd.DataFrame({"image": [str(f) for f in files], "probability": prob.astype(np.float64),
                             "decision": (prob >= self.info["threshold"]).astype(int)})
