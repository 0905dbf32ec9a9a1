"""What a saved model decides for a job: the model loaded, flags that contradict it refused, its settings
taken into the job's configuration (``core.settings.MODEL_SETTINGS`` names them all)."""
from __future__ import annotations

from dataclasses import replace

from ..config import ConfigError, JobConfig
from ..core.settings import MODEL_SETTINGS, ModelSetting
from .embedding import uses_images


def load_saved_model(path: str):
    from ..core.model import ModelError, load_model

    try:
        return load_model(path)
    except ModelError as e:
        raise ConfigError(f"--model: {e}") from None


def with_setting(cfg: JobConfig, setting: ModelSetting, value: object) -> JobConfig:
    """``cfg`` with one setting replaced (``setting.config`` is a dotted path into the frozen dataclasses)."""
    head, _, rest = setting.config.partition(".")
    if not rest:
        return replace(cfg, **{head: value})
    return replace(cfg, **{head: replace(getattr(cfg, head), **{rest: value})})


def apply_model(cfg: JobConfig, model, explicit: frozenset[str]) -> JobConfig:
    """A saved model decides the embedding, feature and index settings: refuse flags that contradict it, and
    take the model's values (the embedding settings only from a model fitted on images)."""
    m = model.meta
    for s in sorted(MODEL_SETTINGS, key=lambda s: s.dest):
        if s.dest not in explicit or (s.meta is not None and s.get(cfg) == s.from_meta(getattr(m, s.meta))):
            continue
        model_value = f" (the model has {s.from_meta(getattr(m, s.meta))})" if s.meta is not None else ""
        raise ConfigError(f"{s.flag} conflicts with the saved model in --model{model_value}: "
                          f"drop the flag, or fit a new model into a new --model directory")
    images = m.backbone is not None
    if not images and uses_images(cfg.query):
        raise ConfigError("--model holds a model fitted on precomputed embeddings; score a source with "
                          "--embedding-column")
    if images and cfg.query is not None and cfg.query.embedding_column:
        raise ConfigError("--model was fitted on images; --embedding-column vectors cannot be scored against it")
    for s in MODEL_SETTINGS:
        if s.meta is not None and s.applied and (images or not s.images):
            cfg = with_setting(cfg, s, s.from_meta(getattr(m, s.meta)))
    return cfg


def check_model_weights(model, weights) -> None:
    """Refuse weights whose file changed since the model was fitted."""
    if weights is not None and weights.identity != model.meta.weights_identity:
        raise ConfigError(f"weights {weights.identity} differ from the model's {model.meta.weights_identity}")
