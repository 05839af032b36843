"""External validation of an exported bundle on another site's labelled cohort
(`stagewise evaluate BUNDLE MANIFEST`): TRIPOD+AI's test of a model on data it was not
trained on, from a hospital or period other than the development cohort's. That the data is
new is checked, not assumed (`overlap`: the bundle's record of its training images and
patients); a cohort that overlaps is evaluated but not called external.

Split by job: `options` (what the user may change, checked all at once), `manifest` (the
manifest read and checked as `stagewise run` reads one, scored by the bundle), `overlap`
(the cohort against the bundle's training set, the figures without the overlapping
patients), `validation` (the figures, computed by stagewise.evaluation), `outputs` (the
output folder and the recalibrated bundle). `evaluate_bundle` in `evaluate` ties them together.
"""

from stagewise.external.evaluate import evaluate_bundle
from stagewise.external.options import EvaluateError, ExternalOptions

__all__ = ["EvaluateError", "ExternalOptions", "evaluate_bundle"]
