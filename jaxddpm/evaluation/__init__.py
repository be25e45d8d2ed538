"""Evaluation: bits/dim on held-out data, and FID / IS / KID of samples.

The numbers of the DDPM paper's Table 1 (CIFAR-10: FID 3.17, IS 9.46,
NLL <= 3.75 bits/dim), computed the way the community computes them. One
concern per module:

- `metrics`: Fréchet distance, Inception Score and KID of feature sets (float64
  NumPy), `FeatureStats`.
- `features`: the feature extractors (FID Inception-v3, the offline digits
  classifier), cached reference statistics of a data set, `compute_metrics`.
- `bpd`: bits/dim over a data set, the full variational bound with its
  per-timestep terms.
- `run`: the metrics logged during training (`training_metrics`, which samples
  through a `sample_fn` its caller passes) and those of a trained run
  (`evaluate_run`).

Evaluators take their samples from the caller (a `sample_fn`, or images) and
never import the training loop or the sampling CLI. The public names are
re-exported here: `from jaxddpm import evaluation; evaluation.frechet_distance(...)`.
"""

from jaxddpm.digits_classifier import DigitsExtractor
from jaxddpm.evaluation.bpd import bits_per_dim
from jaxddpm.evaluation.bpd import held_out_bits_per_dim
from jaxddpm.evaluation.features import compute_metrics
from jaxddpm.evaluation.features import dataset_reference_stats
from jaxddpm.evaluation.features import eval_dir
from jaxddpm.evaluation.features import EvaluationError
from jaxddpm.evaluation.features import extract_features
from jaxddpm.evaluation.features import extractor_from_config
from jaxddpm.evaluation.features import FeatureExtractor
from jaxddpm.evaluation.features import InceptionExtractor
from jaxddpm.evaluation.features import InceptionWeightsError
from jaxddpm.evaluation.features import METRICS
from jaxddpm.evaluation.features import reference_stats
from jaxddpm.evaluation.metrics import feature_stats
from jaxddpm.evaluation.metrics import FeatureStats
from jaxddpm.evaluation.metrics import frechet_distance
from jaxddpm.evaluation.metrics import inception_score
from jaxddpm.evaluation.metrics import kid
from jaxddpm.evaluation.run import evaluate_run
from jaxddpm.evaluation.run import parse_metrics
from jaxddpm.evaluation.run import prepare_run_metrics
from jaxddpm.evaluation.run import RUN_METRICS
from jaxddpm.evaluation.run import scalars
from jaxddpm.evaluation.run import training_metrics
from jaxddpm.evaluation.run import write_json

__all__ = [
    'frechet_distance', 'inception_score', 'kid', 'FeatureStats', 'feature_stats',
    'FeatureExtractor', 'InceptionExtractor', 'DigitsExtractor', 'EvaluationError',
    'InceptionWeightsError', 'extract_features', 'extractor_from_config', 'eval_dir',
    'reference_stats', 'dataset_reference_stats', 'compute_metrics', 'METRICS',
    'bits_per_dim', 'held_out_bits_per_dim',
    'training_metrics', 'prepare_run_metrics', 'evaluate_run', 'parse_metrics', 'RUN_METRICS',
    'scalars', 'write_json',
]
