"""SimSiam (Chen & He, CVPR 2021) at cluster scale on Ray.

The paper's concepts each have one home: :mod:`simsiam.config` (the typed config tree),
:mod:`simsiam.model` (backbones, projector, predictor), :mod:`simsiam.loss`, :mod:`simsiam.augment`,
:mod:`simsiam.data` (shards and Ray Data ingest), :mod:`simsiam.optim` (schedules, LARS),
:mod:`simsiam.metrics` (collapse indicators, kNN), :mod:`simsiam.train` (the Ray Train loop),
:mod:`simsiam.evaluate` (linear evaluation), :mod:`simsiam.search` (Tune + Optuna).
"""
__version__ = "0.1.0"
