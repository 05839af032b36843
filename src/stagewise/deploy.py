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
from stagewise.models import Backbone, Head, Network, build_arch, save_backbone
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


class SharedHeads(torch.nn.Module):
    """One backbone pass, K heads: [0, 1] one-channel images in, (N, K) probabilities out.

    Arms that froze the same backbone (probe stages on one pretrained trunk) differ only in
    their heads, so a bundle of them computes the trunk once per image for all tasks.
    """

    def __init__(self, backbone: Backbone, heads: dict[str, torch.nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.ModuleDict(heads)

    def forward(self, x):
        features = self.backbone(x)
        return torch.cat([torch.sigmoid(h(features)) for h in self.heads.values()], dim=1)


def export_onnx(model: torch.nn.Module, path: Path, image_size: int) -> Path:
    example = torch.rand(2, 1, *([image_size] * model.backbone.spatial_dims))
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    torch.onnx.export(
        model, (example,), str(path), input_names=["image"], output_names=["probability"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
    )
    return path


def _model_card(info: dict) -> str:
    lines = [f"# {info['recipe']}: {', '.join(t['arm'] for t in info['tasks'])}", ""]
    lines.append(f"- Backbone: `{info['backbone']}`, shared by {len(info['tasks'])} head(s); trained on {info['source']}")
    lines.append(f"- Input: one-channel image, resized ({info['resize']}) to {info['image_size']} px, intensities in [0, 1]")
    for t in info["tasks"]:
        s = t["metrics"]
        lines.append(
            f"- `{t['output']}` (arm {t['arm']}, stages {' -> '.join(t['stages'])}): probability of "
            f"{t['outcome']}; decision threshold {t['threshold']:.4f} (chosen on training data). "
            f"Cross-validated ({t['n_folds']} folds): AUROC {s['auroc']['mean']:.3f} ± {s['auroc']['sd']:.3f}, "
            f"balanced accuracy {s['balanced_accuracy']['mean']:.3f} ± {s['balanced_accuracy']['sd']:.3f}, "
            f"F1 {s['f1']['mean']:.3f} ± {s['f1']['sd']:.3f}"
        )
    lines += ["", f"stagewise {info['stagewise']}. Research use only. Validate on local data before any clinical",
              "use; the cross-validated figures describe the development cohort, not another site."]
    return "\n".join(lines) + "\n"


def _fold_network(run_dir: Path, arm: str, fold: str) -> tuple[Network, float]:
    model_path = run_dir / "folds" / arm / f"{fold}.safetensors"
    if not model_path.is_file():
        raise RunError(f"{model_path} does not exist: set `compute.save_models: true` and run the arm again, or use --refit")
    threshold = json.loads((run_dir / "folds" / arm / f"{fold}.json").read_text())["metrics"]["threshold"]
    return load_network(model_path), threshold


def export_bundle(run_dir: str | Path, arms: str | list[str], out: str | Path, fold: str | None = None,
                  refit: bool = False) -> Path:
    """Bundle arms' models (a saved fold model, `fold` e.g. r0-f0, or a refit on every image).

    Several arms go into one bundle only when their trained backbones are bit-identical:
    the bundle then holds that backbone once and one head per arm."""
    run_dir, out = Path(run_dir), Path(out)
    arms = [arms] if isinstance(arms, str) else list(arms)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise RunError(f"{run_dir}: no metrics.json; finish the study first")
    metrics = json.loads(metrics_path.read_text())
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()), source=str(run_dir / "recipe.yaml"))
    configs = {a.name: a for a in recipe.arms}
    unknown = [a for a in arms if a not in configs]
    if unknown:
        raise RunError(f"{run_dir}: no model arm(s) {unknown}; arms: {sorted(configs)}")
    fused = [a for a in arms if configs[a].head.fusion]
    if fused:
        raise RunError(f"arms {fused} fuse clinical data; a bundle takes images only")
    if refit == (fold is not None):
        raise RunError("choose exactly one of --fold (a saved fold model) and --refit (train on every image)")
    nets, thresholds = {}, {}
    for arm in arms:
        if refit:
            nets[arm], thresholds[arm] = _refit(recipe, arm, metrics["arms"][arm])
        else:
            nets[arm], thresholds[arm] = _fold_network(run_dir, arm, fold)
    backbone = nets[arms[0]].backbone
    reference = backbone.state_dict()
    for arm in arms[1:]:
        other = nets[arm].backbone.state_dict()
        if other.keys() != reference.keys() or any(not torch.equal(other[k], reference[k]) for k in reference):
            raise RunError(f"arms {arms[0]!r} and {arm!r} do not share one backbone (only arms whose backbone stayed "
                           "frozen on the same weights do); export them as separate bundles")
    out.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, out / "backbone.safetensors")
    heads = {arm: nets[arm].head for arm in arms}
    _save_heads(heads, {arm: configs[arm].head for arm in arms}, out / "heads.safetensors")
    export_onnx(SharedHeads(backbone, heads), out / "model.onnx", recipe.data.image_size)
    shutil.copy(run_dir / "recipe.yaml", out / "recipe.yaml")
    tasks = []
    for arm in arms:
        unit = metrics["arms"][arm]
        names = [recipe.cohort.outcome, *recipe.cohort.extra_outcomes]
        for j, outcome in enumerate(names[: heads[arm].layers[-1].out_features]):
            tasks.append({
                "output": arm if j == 0 else f"{arm}:{outcome}", "arm": arm, "outcome": outcome,
                "stages": [st.kind for st in configs[arm].stages], "n_folds": len(unit["folds"]),
                "threshold": thresholds[arm] if j == 0 else _task_threshold(unit, outcome, refit, run_dir, arm, fold),
                "metrics": unit["summary"] if j == 0 else unit["tasks"][outcome],
            })
    info = {
        "stagewise": __version__, "recipe": recipe.name, "backbone": configs[arms[0]].backbone.name,
        "image_size": recipe.data.image_size, "resize": recipe.data.resize, "tasks": tasks,
        "source": "every image of the cohort (refit after cross-validation)" if refit else f"the training part of fold {fold}",
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=2))
    (out / "MODEL_CARD.md").write_text(_model_card(info))
    return out


def _task_threshold(unit: dict, outcome: str, refit: bool, run_dir: Path, arm: str, fold: str | None) -> float:
    if refit:
        return float(np.median([f["tasks"][outcome]["threshold"] for f in unit["folds"]]))
    return json.loads((run_dir / "folds" / arm / f"{fold}.json").read_text())["metrics"]["tasks"][outcome]["threshold"]


def _save_heads(heads: dict[str, torch.nn.Module], configs: dict[str, HeadConfig], path: Path) -> None:
    from safetensors.torch import save_file

    state = {f"{arm}.{k}": v.detach().cpu().contiguous() for arm, h in heads.items() for k, v in h.state_dict().items()}
    meta = {"heads": json.dumps([
        {"arm": arm, "head": configs[arm].model_dump(), "in_features": h.layers[-1].in_features if not configs[arm].hidden
         else h.layers[1].in_features, "n_outputs": h.layers[-1].out_features} for arm, h in heads.items()
    ])}
    save_file(state, str(path), metadata=meta)


def _load_heads(path: Path) -> dict[str, Head]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        specs = json.loads(f.metadata()["heads"])
    state = load_file(str(path))
    heads = {}
    for spec in specs:
        cfg = HeadConfig.model_validate(spec["head"])
        head = Head(spec["in_features"], spec["n_outputs"], cfg.dropout, cfg.hidden)
        prefix = spec["arm"] + "."
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        heads[spec["arm"]] = head.eval()
    return heads


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
    model: SharedHeads

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        from stagewise.models.backbones import create_backbone

        path = Path(path)
        if not (path / "bundle.json").is_file():
            raise RunError(f"{path}: not a stagewise bundle (no bundle.json); make one with `stagewise export`")
        backbone = create_backbone(f"file:{path / 'backbone.safetensors'}")
        model = SharedHeads(backbone, _load_heads(path / "heads.safetensors")).float().eval()
        return cls(path, json.loads((path / "bundle.json").read_text()), model)

    def images(self, files: list[str | Path]) -> torch.Tensor:
        from stagewise.data import load_images

        return load_images([str(f) for f in files], self.info["image_size"], self.info["resize"])

    @torch.no_grad()
    def predict(self, files: list[str | Path], engine: str = "torch") -> pd.DataFrame:
        """Per image: a probability and a decision per output, the backbone run once."""
        if engine not in ("torch", "onnx"):
            raise RunError(f"engine {engine!r}: choose torch or onnx")
        x = self.images(files).float()
        if engine == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(self.path / "model.onnx"), providers=["CPUExecutionProvider"])
            prob = session.run(None, {"image": x.numpy()})[0]
        else:
            prob = self.model(x).numpy()
        table = pd.DataFrame({"image": [str(f) for f in files]})
        for j, task in enumerate(self.info["tasks"]):
            table[f"probability:{task['output']}"] = prob[:, j].astype(np.float64)
            table[f"decision:{task['output']}"] = (prob[:, j] >= task["threshold"]).astype(int)
        return table
