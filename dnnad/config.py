"""One typed configuration object per run, validated in one place before any work (and before Ray) starts.

Pure Python: importing it (and so ``dnnad --help``) loads neither torch nor faiss nor Ray.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field

from .core.settings import COMPRESSED_KINDS, DUPLICATE_RATIO, DUPLICATE_SIMILARITY, INDEX_KINDS, NORMALIZE_KINDS
from .vision.specs import DEFAULT_BACKBONE, RUNTIMES, BackboneSpec, get_spec

JOB_KINDS = ("score", "rank", "audit")
MAX_IMAGE_SIZE = 4096  # a crop side above this would resize every image to gigabytes
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
AUDIT_MAX_ERROR_FRACTION = 0.5  # a nightly audit with most rows unreadable (a lost mount) fails loudly for cron


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
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files become error rows, never read
    embedding_column: str | None = None  # Parquet only: precomputed vectors instead of image bytes
    label_column: str | None = None  # rank: each row's label, a column or "dir:N"; read as ``label``


@dataclass(frozen=True)
class EmbedConfig:
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"  # imagenet | none | PATH
    image_size: int | None = None
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch threads per CPU actor
    actors: int | None = None  # embedding actors; default one per GPU, or CPUs // threads
    layers: tuple[str, ...] = ()  # pooled intermediate modules (and/or "final"), each L2-normalised, concatenated
    tta: str | None = None  # "flip": average with the horizontally flipped image
    resize: str = "crop"  # crop (resize + centre crop) | full (whole image to a square)
    runtime: str = "auto"  # auto | torch | onnxruntime | openvino: what runs the network on CPU (same embedding)
    decode: str = "exact"  # exact | reduced: large JPEGs decoded at 1/2-1/8 scale, still >= 2x the resize size
    precision: str = "fp32"  # fp32 | bf16 (OpenVINO on a CPU with bf16: 3x the images/s, not the same embedding)
    localize: bool = False  # patch features and anomaly maps (core.localize); the whole image: --resize full

    def spec(self) -> BackboneSpec:
        """The backbone spec these settings embed with (raises ValueError on an unknown option)."""
        return get_spec(self.backbone, self.image_size, self.layers, self.tta, "full" if self.localize else self.resize,
                        self.decode, self.precision, self.localize)


@dataclass(frozen=True)
class FeatureConfig:
    """Vector transforms fitted on the normal set and applied before the kNN (``core.features``)."""

    normalize: str | None = "l2"  # unit-length embeddings (default: measured best on every kind of data), or None
    whiten: bool = False  # Ledoit-Wolf whitening: scores become Mahalanobis-like distances
    pca: int | None = None  # keep this many principal components of the normal set (a smaller, faster index)


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "flat"  # one of INDEX_KINDS; flat is exact
    shards: int = 1
    reduce: int | None = None  # k-means centroids replacing the normal set
    approximate: bool = False  # ivfpq/sq8: distances from the codes, no exact re-rank (vectors never read)
    coreset: float | None = 0.1  # --localize: fraction of normal patches the bank keeps (greedy k-centre; 1 = all)


IMAGE_PARTITION_ROWS = 100_000
VECTOR_PARTITION_ROWS = 1_000_000


@dataclass(frozen=True)
class ScoreConfig:
    k: int = 2
    quantile: float = 0.99
    contamination: float | None = None
    actors: int | None = None
    batch_size: int = 4096  # FAISS's BLAS kNN works on 4096-query blocks
    exclude_duplicates: bool = False
    shard_groups: int = 1  # actor pools that each hold a contiguous group of the shards (at most --shards)
    partition_rows: int | None = None  # query rows per partition, the unit a killed run resumes from (None: auto)

    def rows_per_partition(self, vectors: bool) -> int:
        """Partition size: each partition is one streaming execution (actor pools start again), so a partition
        of precomputed vectors, ~100x cheaper per row than an image, is 10x larger."""
        return self.partition_rows or (VECTOR_PARTITION_ROWS if vectors else IMAGE_PARTITION_ROWS)


@dataclass(frozen=True)
class RankConfig:
    """The unsupervised setting: drop a fraction (or every row above a score) per round, then refit."""

    drop: float | None = None
    drop_score: float | None = None
    rounds: int = 1
    duplicates: bool = True  # near-duplicate groups (OUT/duplicates) from the first round's kNN search
    duplicate_ratio: float = DUPLICATE_RATIO  # a pair's distance against its rows' neighbourhoods (core.duplicates)
    duplicate_similarity: float = DUPLICATE_SIMILARITY  # fingerprint correlation beyond the neighbourhood's
    drop_duplicates: bool = False  # keep only each group's first member
    drop_suspects: bool = False  # with a label column: drop rows whose neighbours out-vote their label


@dataclass(frozen=True)
class AuditConfig:
    date: str | None = None  # YYYY-MM-DD, default today
    cache: str | None = None  # embedding cache root, default OUT/cache
    top: int = 20


@dataclass(frozen=True)
class JobConfig:
    """Everything one score / rank / audit run needs."""

    kind: str
    out: str
    normal: SourceConfig | None = None  # the normal set (score) or the set to rank (rank)
    query: SourceConfig | None = None
    model_dir: str | None = None
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    max_error_fraction: float | None = None  # more error rows than this fraction: outputs written, exit non-zero
    overwrite: bool = False
    quiet: bool = False
    verbose: bool = False
    explicit: tuple[str, ...] = ()  # settings the user gave (not defaults): a saved model may not contradict them

    def locations(self) -> dict[str, str]:
        """Every location the run names (paths or URIs), by flag."""
        named = (("--out", self.out), ("--model", self.model_dir), ("--cache", self.audit.cache),
                 ("--data" if self.kind == "rank" else "--normal", self.normal.uri if self.normal else None),
                 ("--query", self.query.uri if self.query else None))
        return {flag: uri for flag, uri in named if uri}

    def to_dict(self) -> dict:
        """The configuration as it is recorded: locations with their credentials removed."""
        from .storage import redact

        doc = asdict(self)
        doc["out"], doc["model_dir"], doc["audit"]["cache"] = redact(self.out), redact(self.model_dir), \
            redact(self.audit.cache)
        for role in ("normal", "query"):
            if doc[role] is not None:
                doc[role]["uri"] = redact(doc[role]["uri"])
        return doc

    def fingerprint(self) -> str:
        """Identity of what a run computes (not how it reports or whether it may overwrite): a killed run
        with the same fingerprint is resumed."""
        doc = {k: v for k, v in self.to_dict().items() if k not in ("overwrite", "quiet", "verbose", "explicit",
                                                                    "max_error_fraction")}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def run_date(self) -> str:
        return self.audit.date or dt.date.today().isoformat()

    @property
    def _sample_flag(self) -> str:
        """The flag sampling the fitted set: the rank job calls its one set --data."""
        return "--sample" if self.kind == "rank" else "--normal-sample"

    def check_fit_settings(self) -> None:
        """Checks of the settings a fit decides, for a job that fits (a saved model decides them otherwise)."""
        if "coreset" in self.explicit and not self.embed.localize:
            raise ConfigError("--coreset subsamples the patch memory bank: it needs --localize")
        if self.index.approximate and self.index.kind not in COMPRESSED_KINDS:
            raise ConfigError(f"--approximate scores a compressed index from its codes: it needs --index "
                              f"{' or '.join(COMPRESSED_KINDS)}, not {self.index.kind}")

    def validate(self) -> JobConfig:
        """Raise ConfigError on anything that would fail later; returns self. Reads no data."""
        if self.kind not in JOB_KINDS:
            raise ConfigError(f"unknown job kind {self.kind!r}")
        from .storage import StorageError, resolve

        for flag, uri in self.locations().items():
            try:
                resolve(uri)
            except StorageError as e:
                raise ConfigError(f"{flag}: {e}") from None
        try:
            self.embed.spec()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.features.normalize is not None and self.features.normalize not in NORMALIZE_KINDS:
            raise ConfigError(f"--normalize must be none or one of {', '.join(NORMALIZE_KINDS)}, "
                              f"got {self.features.normalize!r}")
        w = self.embed.weights
        if w not in ("imagenet", "none") and not self.embed.backbone.startswith("onnx:") and not os.path.isfile(w):
            raise ConfigError(f"--weights must be imagenet, none or an existing file; not found: {w}")
        _in_range("--image-size", self.embed.image_size, 8, MAX_IMAGE_SIZE)
        _in_range("--batch-size", self.embed.batch_size, 1, 65536)
        _in_range("--threads", self.embed.threads, 1, 1024)
        _in_range("--actors", self.embed.actors, 1, 100_000)
        if self.embed.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.embed.runtime!r}")
        if self.embed.precision == "bf16" and self.embed.runtime not in ("auto", "openvino"):
            raise ConfigError(f"--precision bf16 runs in OpenVINO, not --runtime {self.embed.runtime}")
        needs_openvino = self.embed.runtime == "openvino" or self.embed.precision == "bf16"
        if needs_openvino and importlib.util.find_spec("openvino") is None:
            raise ConfigError("--runtime openvino and --precision bf16 need OpenVINO: pip install 'dnnad[openvino]'")
        if self.embed.precision == "bf16":
            from .vision.onnx_session import has_bf16

            if not has_bf16():
                raise ConfigError("--precision bf16: this machine's CPU has no bf16 support; use fp32")
        if self.embed.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.embed.device!r}")
        if self.max_error_fraction is not None and not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError(f"--max-error-fraction must be in [0, 1], got {self.max_error_fraction}")
        _in_range("--k", self.score.k, 1, 10_000)
        if not 0.0 < self.score.quantile <= 1.0:
            raise ConfigError(f"--quantile must be in (0, 1], got {self.score.quantile}")
        if self.score.contamination is not None and not 0.0 <= self.score.contamination < 1.0:
            raise ConfigError(f"--contamination must be in [0, 1), got {self.score.contamination}")
        _in_range("--score-actors", self.score.actors, 1, 100_000)
        _in_range("--score-batch-size", self.score.batch_size, 1, 1 << 20)
        _in_range("--partition-rows", self.score.partition_rows, 1, 1 << 40)
        _in_range("--shard-groups", self.score.shard_groups, 1, 100_000)
        if self.index.kind not in INDEX_KINDS:
            raise ConfigError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {self.index.kind!r}")
        _in_range("--shards", self.index.shards, 1, 100_000)
        _in_range("--reduce kmeans:N", self.index.reduce, 2, 1 << 31)
        _in_range("--pca", self.features.pca, 1, 1 << 20)
        for sample_flag, src in ((self._sample_flag, self.normal), ("--query-sample", self.query)):
            if src is None:
                continue
            _in_range(sample_flag, src.sample, 1, 1 << 40)
            _in_range("--max-file-bytes", src.max_file_bytes, 1, 1 << 40)
            for flag, value in (("--group-by", src.group_by), ("--label-column", src.label_column)):
                if value and value.startswith("dir:") and not (value[4:].isdigit() and int(value[4:]) >= 1):
                    raise ConfigError(f"{flag} dir:N needs a folder level N >= 1, got {value!r}")
        self._validate_localize()
        self._validate_kind()
        return self

    def _validate_localize(self) -> None:
        c = self.index.coreset
        if c is not None and not 0.0 < c <= 1.0:
            raise ConfigError(f"--coreset must be a fraction in (0, 1], got {c}")
        if not self.embed.localize:
            if "coreset" in self.explicit and not self.model_dir:  # else a saved model decides (check_fit_settings)
                raise ConfigError("--coreset subsamples the patch memory bank: it needs --localize")
            return
        if self.kind == "rank":
            raise ConfigError("--localize maps anomalies in scored images: use it with the score or audit job")
        for refused, flag in ((self.index.reduce, "--reduce"), (self.score.exclude_duplicates, "--exclude-duplicates"),
                              (self.embed.decode != "exact", "--decode reduced")):
            if refused:
                raise ConfigError(f"--localize keeps every normal image's patches and maps each image at its own "
                                  f"size: drop {flag}")
        if "resize" in self.explicit and self.embed.resize != "full":
            raise ConfigError("--localize maps the whole image as the network saw it: drop --resize crop")
        bank_kinds = ("flat", *COMPRESSED_KINDS)
        if self.index.kind not in bank_kinds:
            raise ConfigError(f"--localize keeps its patch bank in flat shards or compressed codes "
                              f"(--index {' or '.join(bank_kinds)}): {self.index.kind} would hold more than flat")
        for src in (self.normal, self.query):
            if src is not None and src.embedding_column:
                raise ConfigError("--localize needs images (patch features), not the vectors of --embedding-column")
        if self.query is not None and self.query.group_by:
            raise ConfigError("--localize maps single images; --group-by scores groups")

    def _validate_kind(self) -> None:
        if self.kind == "score":
            if self.query is None:
                raise ConfigError("--query is needed")
        elif self.kind == "rank":
            if self.normal is None:
                raise ConfigError("--data is needed")
            r = self.rank
            if r.drop is not None and not 0.0 <= r.drop < 1.0:
                raise ConfigError(f"--drop must be in [0, 1), got {r.drop}")
            if r.drop is not None and r.drop_score is not None:
                raise ConfigError("give --drop or --drop-score, not both")
            _in_range("--rounds", r.rounds, 1, 1000)
            if not 0.0 < r.duplicate_ratio <= 2.0:
                raise ConfigError(f"--duplicate-ratio must be in (0, 2] (a pair's distance over its neighbourhood's), "
                                  f"got {r.duplicate_ratio}")
            if not -3.0 <= r.duplicate_similarity < 1.0:
                raise ConfigError(f"--duplicate-similarity must be in [-3, 1) (a correlation's excess over the "
                                  f"neighbourhood's, as a share of what it left to 1), got {r.duplicate_similarity}")
            if r.drop_suspects and not self.normal.label_column:
                raise ConfigError("--drop-suspects needs --label-column")
            if self.normal.label_column and self.index.reduce:
                raise ConfigError("--label-column needs the leave-one-out kNN search, which --reduce replaces")
            if r.drop_duplicates and not r.duplicates:
                raise ConfigError("--drop-duplicates needs the duplicate groups; drop --no-duplicates")
            if r.drop_duplicates and self.index.reduce:
                raise ConfigError("--drop-duplicates needs the leave-one-out kNN search, which --reduce replaces")
        elif self.kind == "audit":
            if self.query is None:
                raise ConfigError("--query is needed")
            if not self.model_dir:
                raise ConfigError("the audit needs --model DIR holding a saved model "
                                  "(fit one with the score job: dnnad score ... --model DIR)")
            try:
                dt.date.fromisoformat(self.run_date)
            except ValueError:
                raise ConfigError(f"--date must be YYYY-MM-DD, got {self.audit.date!r}") from None
            _in_range("--top", self.audit.top, 0, 100_000)


def _in_range(flag: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise ConfigError(f"{flag} must be between {lo} and {hi}, got {value}")
