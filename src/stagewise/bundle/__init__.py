"""Bundles: an exported model (weights, ONNX, preprocessing, threshold, validation figures and
model card) that `predict`, `evaluate` and `serve` load, and their export from a run or from a
deployed federated job's coordinator."""

from stagewise.bundle.bundle import Bundle
from stagewise.bundle.export import export_bundle
from stagewise.bundle.oof import VALIDATION_FILE
from stagewise.bundle.recalibration import recalibrated_bundle
from stagewise.bundle.federation import export_federation_bundle

__all__ = ["VALIDATION_FILE", "Bundle", "export_bundle", "export_federation_bundle", "recalibrated_bundle"]
