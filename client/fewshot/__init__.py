"""Few-shot feature methods on cached features, and their honest selection (issue 13).

Pure numerics: everything here takes features as tensors and knows nothing about HTTP, the
feature cache or the tuner, so it runs the same in `cbbt tune`, `cbbt bench` and the
benchmark scripts.

- `shots`: the labelled shots `[N, V, D]` and stratified folds (by image, not view);
- `gda`: Gaussian discriminant analysis with shrinkage, fused with the zero-shot logits;
- `probes`: a CLAP-style probe anchored to the text features, and a plain linear probe;
- `templates`: prompt ensembles over general template sets;
- `methods`: each method with its grid, as data;
- `select`: k-fold cross-validation over all shots, the choice (or an ensemble), the refit.
"""

from client.fewshot.methods import FeatureMethod, FitContext, default_methods
from client.fewshot.select import Selection, accuracy, cross_validate, select_and_fit
from client.fewshot.shots import Shots, stratified_folds

__all__ = [
    "FeatureMethod",
    "FitContext",
    "Selection",
    "Shots",
    "accuracy",
    "cross_validate",
    "default_methods",
    "select_and_fit",
    "stratified_folds",
]
