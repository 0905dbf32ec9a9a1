"""One typed configuration object per run, validated at the edge before any work starts."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .backbones import DEFAULT_BACKBONE, get_spec
from .index import INDEX_KINDS


class ConfigError(ValueError):
    """A configuration that cannot run; its message is a one-line explanation for the user."""


@dataclass(frozen=True)
class SourceConfig:
    """Where images come from: an image folder, or a Parquet file/dataset with an encoded-bytes column."""

    uri: str
    filters: tuple[tuple[str, str], ...] = ()  # (column, value) pairs, ANDed; Parquet only
    id_column: str = "id"
    image_column: str = "image"
    group_by: str | None = None  # column name, or "dir:N" for the N-th folder level
    sample: int | None = None  # a fixed-seed random sample of N rows (after filtering), in source order


@dataclass(frozen=True)
class EmbedConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"  # imagenet | none | PATH
    image_size: int | None = None
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch threads per CPU actor
    actors: int | None = None  # embedding actors; default one per GPU, or CPUs // threads


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "flat"  # flat (exact) | ivf | hnsw
    shards: int = 1
    reduce: int | None = None  # k-means centroids replacing the normal set


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 2
    quantile: float = 0.99
    contamination: float | None = None
    actors: int | None = None
    batch_size: int = 1024
    exclude_duplicates: bool = False


@dataclass(frozen=True)
class JobConfig:
    """Everything one fit / score / rank run needs."""

    out: str
    normal: SourceConfig | None = None
    query: SourceConfig | None = None
    model_dir: str | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    overwrite: bool = False
    quiet: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "JobConfig":
        """Raise ConfigError on anything that would fail later; returns self."""
        try:
            get_spec(self.embed.backbone, self.embed.image_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        w = self.embed.weights
        if w not in ("imagenet", "none") and not self.embed.backbone.startswith("onnx:") and not os.path.isfile(w):
            raise ConfigError(f"--weights must be imagenet, none or an existing file; not found: {w}")
        if self.score.k < 1:
            raise ConfigError(f"--k must be >= 1, got {self.score.k}")
        if not 0.0 < self.score.quantile <= 1.0:
            raise ConfigError(f"--quantile must be in (0, 1], got {self.score.quantile}")
        if self.score.contamination is not None and not 0.0 <= self.score.contamination < 1.0:
            raise ConfigError(f"--contamination must be in [0, 1), got {self.score.contamination}")
        if self.index.kind not in INDEX_KINDS:
            raise ConfigError(f"--index must be one of {INDEX_KINDS}, got {self.index.kind!r}")
        if self.index.shards < 1:
            raise ConfigError(f"--shards must be >= 1, got {self.index.shards}")
        if self.index.reduce is not None and self.index.reduce < 2:
            raise ConfigError(f"--reduce kmeans:N needs N >= 2, got {self.index.reduce}")
        for src in (self.normal, self.query):
            if src is not None and src.sample is not None and src.sample < 1:
                raise ConfigError(f"sample sizes must be >= 1, got {src.sample}")
        if self.embed.batch_size < 1 or self.score.batch_size < 1:
            raise ConfigError("batch sizes must be >= 1")
        return self
