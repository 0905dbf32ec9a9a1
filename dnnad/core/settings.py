"""The settings a saved model decides, each described once: its flag, its ``JobConfig`` path, the ``ModelMeta``
field that records it and the ``FitParams`` field (also the ``DN2`` estimator parameter) that fits with it.

The job's contradiction checks (``jobs.model_settings.apply_model``), both ``FitParams`` builders, the model's
metadata (``core.model.model_from_fit``) and the model format version derive from ``MODEL_SETTINGS``; adding
a setting is one entry here plus its use. Pure Python: the configuration imports it without numpy or faiss.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq", "sq8")
COMPRESSED_KINDS = ("ivfpq", "sq8")  # kinds holding codes, not vectors; --approximate scores from the codes
NORMALIZE_KINDS = ("l2",)

# near-duplicate verification (core.duplicates), measured in benchmarks/duplicates.py on CIFAR-10 and
# Fashion-MNIST: the ratio test's bound (identical fingerprints) and the fingerprints' excess similarity over
# their neighbourhood needed (identical embeddings); the rule between them is linear
DUPLICATE_RATIO = 2.0
DUPLICATE_SIMILARITY = 0.6


@dataclass(frozen=True)
class ModelSetting:
    """One setting a model decides.

    ``meta``: the ``ModelMeta`` field recording it; None when the model keeps no value to compare with, so
    giving the flag beside a saved model is always refused. ``fit``: the ``FitParams`` field, None for how
    images are embedded (``images``: a model fitted on vectors records the ``ModelMeta`` default).
    ``version``: the model format version that first holds a non-default value. ``applied``: a loaded
    model's value replaces the job's configuration (k is not: scoring takes the model's clamped k).
    ``sequence``: a tuple in the configuration, a list or None in the model's JSON.
    """

    flag: str
    config: str
    meta: str | None = None
    fit: str | None = None
    images: bool = False
    version: int = 2
    applied: bool = True
    sequence: bool = False

    @property
    def dest(self) -> str:
        """The flag's argparse destination: the name in ``JobConfig.explicit``."""
        return self.flag.lstrip("-").replace("-", "_")

    def get(self, cfg: object) -> object:
        """This setting's value in a ``JobConfig``."""
        return functools.reduce(getattr, self.config.split("."), cfg)

    def to_meta(self, value: object) -> object:
        return (list(value) or None) if self.sequence else value

    def from_meta(self, value: object) -> object:
        return tuple(value or ()) if self.sequence else value


MODEL_SETTINGS: tuple[ModelSetting, ...] = (
    ModelSetting("--k", "score.k", meta="k_requested", fit="k", applied=False),
    ModelSetting("--quantile", "score.quantile", fit="quantile"),
    ModelSetting("--contamination", "score.contamination", fit="contamination"),
    ModelSetting("--exclude-duplicates", "score.exclude_duplicates", fit="exclude_duplicates"),
    ModelSetting("--shards", "index.shards", meta="n_shards", fit="n_shards"),
    ModelSetting("--index", "index.kind", meta="index_kind", fit="index"),
    ModelSetting("--reduce", "index.reduce", fit="reduce"),
    ModelSetting("--approximate", "index.approximate", meta="approximate", fit="approximate", version=4),
    ModelSetting("--normalize", "features.normalize", meta="normalize", fit="normalize", version=3),
    ModelSetting("--whiten", "features.whiten", meta="whiten", fit="whiten", version=3),
    ModelSetting("--pca", "features.pca", meta="pca", fit="pca", version=4),
    ModelSetting("--backbone", "embed.backbone", meta="backbone", images=True),
    ModelSetting("--weights", "embed.weights", meta="weights", images=True),
    ModelSetting("--image-size", "embed.image_size", meta="image_size", images=True),
    ModelSetting("--layers", "embed.layers", meta="layers", images=True, version=3, sequence=True),
    ModelSetting("--tta", "embed.tta", meta="tta", images=True, version=3),
    ModelSetting("--resize", "embed.resize", meta="resize", images=True, version=3),
    ModelSetting("--decode", "embed.decode", meta="decode", images=True, version=5),
    ModelSetting("--precision", "embed.precision", meta="precision", images=True, version=5),
    ModelSetting("--localize", "embed.localize", meta="localize", images=True, version=7),  # 7: border calibration
    ModelSetting("--coreset", "index.coreset", meta="coreset", version=6),
    ModelSetting("--normal", "normal"),  # the normal set itself: a saved model was fitted on its own
)
FIT_SETTINGS = tuple(s for s in MODEL_SETTINGS if s.fit)
IMAGE_SETTINGS = tuple(s for s in MODEL_SETTINGS if s.images)
MODEL_FORMAT_VERSION = max(s.version for s in MODEL_SETTINGS)  # the newest format this dnnad writes
READABLE_VERSIONS = tuple(range(2, MODEL_FORMAT_VERSION + 1))  # 2: plain DN2; each later one adds settings


def format_version(meta_values: dict[str, object], defaults: dict[str, object]) -> int:
    """The oldest format version that holds these ``ModelMeta`` values: older dnnad refuses what it cannot
    read rather than ignore a setting."""
    return max([2] + [s.version for s in MODEL_SETTINGS
                      if s.meta and meta_values.get(s.meta, defaults.get(s.meta)) != defaults.get(s.meta)])
