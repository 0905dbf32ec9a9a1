"""What a job embeds with: the backbone's weights resolved once on the driver (then broadcast), and the embed
stage for a prepared source (the backbone on images, or the checked vectors of an ``--embedding-column``)."""
from __future__ import annotations

from ..config import ConfigError, JobConfig
from ..stages.read import read_source


def embed_rows(src, cfg: JobConfig, weights_ref, score_actors: int | None = None, cache_ref=None,
               cache_out: str | None = None, hash_bytes: bool = False, fingerprints: bool = False):
    """The embed stage for a prepared source (lazy); vectors have no ``fingerprint``."""
    if src.cfg.embedding_column:
        from ..stages.vectors import vectors

        return vectors(read_source(src), src.dim)
    from ..stages.embed import embed

    return embed(read_source(src), cfg.embed, weights_ref, src.cfg.max_file_bytes, cache_ref=cache_ref,
                 score_actors=score_actors, cache_out=cache_out, hash_bytes=hash_bytes,
                 fingerprints=fingerprints)


def uses_images(*sources) -> bool:
    return any(s is not None and not s.embedding_column for s in sources)


def resolve_job_weights(cfg: JobConfig, *sources):
    """The embedding weights, resolved once on the driver (then broadcast); ``--layers`` names are checked.
    None when every source already holds vectors."""
    from ..vision.backbones import build_classifier, strip_head, tap_modules
    from ..vision.weights import WeightsError, resolve_weights

    if sources and not uses_images(*sources):
        return None
    spec = cfg.embed.spec()

    try:
        if spec.layers:
            tap_modules(strip_head(build_classifier(spec), spec), spec)
        return resolve_weights(spec, cfg.embed.weights)
    except (WeightsError, ValueError) as e:
        raise ConfigError(str(e)) from None
