"""External validation of an exported bundle on another site's labelled cohort
(`stagewise evaluate BUNDLE MANIFEST`): TRIPOD+AI's test of a model on data it never saw,
from a hospital or period other than the development cohort's.

Split by job: `options` (what the user may change, checked all at once), `cohort` (the
manifest read and checked as `stagewise run` reads one, scored by the bundle), `evidence`
(the figures, computed by stagewise.evaluation), `outputs` (the output folder and the
recalibrated bundle). `evaluate_bundle` in `evaluate` ties them together.
"""

from stagewise.external.evaluate import evaluate_bundle
from stagewise.external.options import EvaluateError, ExternalOptions

__all__ = ["EvaluateError", "ExternalOptions", "evaluate_bundle"]
