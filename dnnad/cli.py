"""``dnnad score|rank|audit``: flags → one validated ``JobConfig`` → the job. ``jobs/*.py`` call this.

Imports nothing heavy at module level: ``dnnad --help`` loads neither torch, faiss nor Ray.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from .config import (
    AUDIT_MAX_ERROR_FRACTION,
    DEFAULT_MAX_FILE_BYTES,
    INDEX_KINDS,
    NORMALIZE_KINDS,
    AuditConfig,
    ConfigError,
    EmbedConfig,
    FeatureConfig,
    IndexConfig,
    JobConfig,
    RankConfig,
    ScoreConfig,
    SourceConfig,
)
from .core.settings import DUPLICATE_RATIO, DUPLICATE_SIMILARITY
from .runtime import Stopped, reset_stops, stop_on_signals
from .storage import redact, scrub, secrets
from .vision.specs import DEFAULT_BACKBONE, RUNTIMES, backbone_names


def _kv(text: str) -> tuple[str, str]:
    col, sep, value = text.partition("=")
    if not sep or not col:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return col, value


def _reduce(text: str) -> int:
    kind, _, n = text.partition(":")
    if kind != "kmeans" or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected kmeans:N, got {text!r}")
    return int(n)


def _layers(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",")) if text.strip() else ()


def _features(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_layers, default=(), metavar="NAME[,NAME...]",
                   help="embed the global average pools of these modules (and/or 'final'), each L2-normalised, "
                        "concatenated; e.g. blocks.4,blocks.5,blocks.6,final (EfficientNet) or layer2,layer3,layer4")
    p.add_argument("--tta", default=None, type=lambda v: None if v == "none" else v, choices=[None, "flip"],
                   metavar="{none,flip}", help="flip: average with the horizontally flipped image")
    p.add_argument("--resize", default="crop", choices=["crop", "full"],
                   help="crop: resize the shorter side, centre crop; full: resize the whole image to a square")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: OpenVINO's bf16 inference on a CPU that has it (3x the images/s of fp32 here; mean "
                        "one-class ROC AUC -0.0023 on CIFAR-10, +0.0003 on Fashion-MNIST: see RESULTS.md); a "
                        "model setting, not the fp32 embedding")
    p.add_argument("--decode", default="exact", choices=["exact", "reduced"],
                   help="reduced: decode JPEGs far larger than the input at 1/2-1/8 scale (libjpeg's DCT "
                        "scaling), keeping at least twice the resize size: 3x faster on 12 MP photos, pixels "
                        "within a few levels; exact: every pixel decoded (see RESULTS.md)")
    p.add_argument("--localize", action="store_true",
                   help="anomaly maps: patch features of intermediate stages against a memory bank of normal "
                        "patches; the score is the map's maximum; adds anomaly_map, map_height, map_width, "
                        "image_height, image_width, peak_x, peak_y (whole images: implies --resize full)")
    p.add_argument("--coreset", type=float, default=0.1, metavar="F",
                   help="with --localize: keep this fraction of the normal patches in the memory bank (greedy "
                        "k-centre, as PatchCore; default 0.1; 1 keeps all, whose leave-one-image-out threshold "
                        "costs an over-fetch of a whole image's patches per query)")
    p.add_argument("--normalize", default="l2", type=lambda v: None if v == "none" else v, choices=[None, *NORMALIZE_KINDS],
                   metavar="{none,l2}", help="l2 (default): unit-length embeddings (cosine-like kNN); none: the "
                                             "paper's plain DN2 on raw pooled features")
    p.add_argument("--whiten", action="store_true",
                   help="whiten with the normal set's Ledoit-Wolf covariance (Mahalanobis-like scores)")
    p.add_argument("--pca", type=int, default=None, metavar="D",
                   help="project embeddings onto the normal set's D leading principal components (smaller index)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (Parquet tables + run.json)")
    p.add_argument("--k", type=int, default=2, help="neighbours averaged into the score (paper: 2)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"one of {', '.join(backbone_names())}")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a state_dict file")
    p.add_argument("--image-size", type=int, default=None, help="crop size (default: the backbone's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per embedding batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--runtime", default="auto", choices=RUNTIMES,
                   help="what runs the network: auto = ONNX Runtime on CPU (the backbone exported once, cached), "
                        "torch on GPU; openvino (pip install 'dnnad[openvino]'): OpenVINO at fp32 on CPU; the "
                        "embedding is the same within 1e-5 relative")
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU embedding actor")
    p.add_argument("--actors", type=int, default=None, help="embedding actors (default: per GPU / CPUs)")
    p.add_argument("--score-actors", type=int, default=None, help="kNN scoring actors")
    p.add_argument("--score-batch-size", type=int, default=4096, help="queries per kNN batch")
    p.add_argument("--partition-rows", type=int, default=None,
                   help="query rows per partition: a killed run restarts from the partitions it committed "
                        "(default: 100,000 images or 1,000,000 --embedding-column vectors)")
    p.add_argument("--shards", type=int, default=1, help="index shards, built in parallel")
    p.add_argument("--shard-groups", type=int, default=1, metavar="G",
                   help="split the shards over G scoring actor pools (each holds 1/G of the index; results are "
                        "merged exactly): for indexes larger than one node's memory")
    p.add_argument("--index", default="flat", choices=INDEX_KINDS,
                   help="flat is exact; the others re-rank their candidates exactly (see --approximate)")
    p.add_argument("--approximate", action="store_true",
                   help="ivfpq/sq8: score from the compressed codes without reading the vectors (not exact)")
    p.add_argument("--reduce", type=_reduce, default=None, metavar="kmeans:N",
                   help="replace the normal set by N k-means centroids")
    p.add_argument("--quantile", type=float, default=0.99, help="threshold quantile of normal LOO scores")
    p.add_argument("--contamination", type=float, default=None, help="expected anomaly rate (sets the threshold)")
    p.add_argument("--model", default=None, metavar="DIR", help="saved model: loaded if it exists, else written")
    p.add_argument("--id-column", default="id")
    p.add_argument("--image-column", default="image")
    p.add_argument("--embedding-column", default=None, metavar="COL",
                   help="Parquet sources hold precomputed vectors in COL (fixed-size list or list of numbers): "
                        "no backbone runs")
    p.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                   help="larger image files become error rows without being read")
    p.add_argument("--max-error-fraction", type=float, default=None, metavar="F",
                   help="exit with status 3 (outputs still written) when more than this fraction of the input rows "
                        f"are error rows (default: {AUDIT_MAX_ERROR_FRACTION} for audits, no limit otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished dnnad run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines (cron)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and per-operator progress")
    _features(p)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dnnad", description="DN2 deep nearest-neighbour anomaly detection on Ray")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="fit on normal images (or load --model) and score a query set")
    s.add_argument("--normal", help="folder, Parquet file/dataset, or URI of normal images")
    s.add_argument("--query", required=True, help="folder, Parquet file/dataset, or URI of images to audit")
    s.add_argument("--normal-filter", type=_kv, action="append", default=[], metavar="COL=VALUE")
    s.add_argument("--query-filter", type=_kv, action="append", default=[], metavar="COL=VALUE")
    s.add_argument("--normal-sample", type=int, default=None, metavar="N", help="a fixed-seed random sample of N normal rows")
    s.add_argument("--query-sample", type=int, default=None, metavar="N", help="a fixed-seed random sample of N query rows")
    s.add_argument("--group-by", default=None, help="score groups: a column, or dir:N (folder level N)")
    _common(s)
    r = sub.add_parser("rank", help="rank one unlabelled set against itself, drop the worst, refit")
    r.add_argument("--data", required=True, help="folder, Parquet file/dataset, or URI")
    r.add_argument("--filter", type=_kv, action="append", default=[], metavar="COL=VALUE")
    r.add_argument("--sample", type=int, default=None, metavar="N", help="a fixed-seed random sample of N rows")
    r.add_argument("--label-column", default=None, metavar="COL",
                   help="labelled data: rank each label's images against that label's, and review every label "
                        "against its neighbours' (a column, or dir:N: folder level N)")
    r.add_argument("--drop-suspects", action="store_true",
                   help="with --label-column: drop images another label out-votes (reason label)")
    r.add_argument("--drop", type=float, default=None, help="fraction of top-ranked rows to drop")
    r.add_argument("--drop-score", type=float, default=None, help="drop rows scoring above this")
    r.add_argument("--rounds", type=int, default=1, help="rank-drop-refit rounds")
    r.add_argument("--exclude-duplicates", action="store_true",
                   help="exact duplicates of a row are not its neighbours either")
    r.add_argument("--duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="write near-duplicate groups to OUT/duplicates (default: on)")
    r.add_argument("--duplicate-ratio", type=float, default=DUPLICATE_RATIO, metavar="R",
                   help="a near-duplicate pair's embedding distance at most R times its neighbourhood's "
                        f"(default {DUPLICATE_RATIO})")
    r.add_argument("--duplicate-similarity", type=float, default=DUPLICATE_SIMILARITY, metavar="S",
                   help="and its images' aligned fingerprints correlated beyond their neighbourhoods' by at least "
                        "S of what those left to 1 (u = (s - level) / (1 - level)); R and S trade off linearly "
                        f"(default {DUPLICATE_SIMILARITY})")
    r.add_argument("--drop-duplicates", action="store_true",
                   help="keep one image per duplicate group (the others are dropped, reason duplicate)")
    _common(r)
    u = sub.add_parser("audit", help="nightly audit: saved model, embedding cache, dated partition, summary, report")
    u.add_argument("--query", required=True, help="folder, Parquet file/dataset, or URI of tonight's images")
    u.add_argument("--query-filter", type=_kv, action="append", default=[], metavar="COL=VALUE")
    u.add_argument("--date", default=None, help="run date YYYY-MM-DD (default: today)")
    u.add_argument("--cache", default=None, metavar="DIR", help="embedding cache (default: OUT/cache)")
    u.add_argument("--top", type=int, default=20, help="anomalies listed in the summary and report")
    _common(u)
    return ap


def config_from_args(a: argparse.Namespace, explicit: tuple[str, ...] = ()) -> JobConfig:
    def src(uri, filters, group=None, sample=None, label=None):
        if not uri:
            return None
        return SourceConfig(uri, tuple(filters), a.id_column, a.image_column, group, sample, a.max_file_bytes,
                            a.embedding_column, label)

    if a.command == "score":
        normal = src(a.normal, a.normal_filter, a.group_by, a.normal_sample)
        query = src(a.query, a.query_filter, a.group_by, a.query_sample)
    elif a.command == "audit":
        normal, query = None, src(a.query, a.query_filter)
    else:
        normal, query = src(a.data, a.filter, None, a.sample, a.label_column), None
    return JobConfig(
        kind=a.command, out=a.out, normal=normal, query=query, model_dir=a.model,
        embed=EmbedConfig(a.backbone, a.weights, a.image_size, a.batch_size, a.device, a.threads, a.actors,
                          a.layers, a.tta, a.resize, a.runtime, a.decode, a.precision, a.localize),
        features=FeatureConfig(a.normalize, a.whiten, a.pca),
        index=IndexConfig(a.index, a.shards, a.reduce, a.approximate, a.coreset),
        score=ScoreConfig(a.k, a.quantile, a.contamination, a.score_actors, a.score_batch_size,
                          exclude_duplicates=getattr(a, "exclude_duplicates", False),
                          partition_rows=a.partition_rows, shard_groups=a.shard_groups),
        rank=RankConfig(getattr(a, "drop", None), getattr(a, "drop_score", None), getattr(a, "rounds", 1),
                        getattr(a, "duplicates", True), getattr(a, "duplicate_ratio", DUPLICATE_RATIO),
                        getattr(a, "duplicate_similarity", DUPLICATE_SIMILARITY),
                        getattr(a, "drop_duplicates", False), getattr(a, "drop_suspects", False)),
        audit=AuditConfig(getattr(a, "date", None), getattr(a, "cache", None), getattr(a, "top", 20)),
        max_error_fraction=(a.max_error_fraction if a.max_error_fraction is not None
                            else AUDIT_MAX_ERROR_FRACTION if a.command == "audit" else None),
        overwrite=a.overwrite, quiet=a.quiet, verbose=a.verbose, explicit=explicit,
    )


def explicit_settings(ap: argparse.ArgumentParser, a: argparse.Namespace, argv: list[str] | None = None
                      ) -> tuple[str, ...]:
    """The settings the user chose: those given on the command line ``argv`` (also when the value given is the
    default: ``--normalize l2`` against a plain saved model is a contradiction), or without ``argv`` those
    whose value is not the default."""
    subs = ap._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them there
    if argv is None:
        return tuple(sorted(k for k, v in vars(a).items() if k != "command" and v != subs[a.command].get_default(k)))
    given = parser()
    for sub in given._subparsers._group_actions[0].choices.values():  # noqa: SLF001
        for action in sub._actions:  # noqa: SLF001
            action.default = argparse.SUPPRESS
    return tuple(sorted(k for k in vars(given.parse_args(argv)) if k != "command"))


def io_error(e: BaseException) -> OSError | None:
    """The I/O error behind ``e``, however deep Ray wrapped it (task errors carry their ``cause``)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    return None


def failure(e: OSError) -> str:
    """One line for an I/O error: what, on which file."""
    what = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return what + (f": {e.filename}" if e.filename else "") + (f" (errno {e.errno})" if e.errno else "")


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    secret = sorted({v for arg in argv for v in secrets(arg)}, key=len, reverse=True)
    if secret:  # Ray records the driver's command line: keep credentials out of it
        sys.argv[:] = [redact(arg) for arg in sys.argv]
    explicit = explicit_settings(ap, a, argv)
    reset_stops()
    stop_on_signals()
    try:
        cfg = config_from_args(a, explicit).validate()
        from .jobs import JOBS

        record = JOBS[cfg.kind](cfg).run()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the job has ended its Ray (Job.run, runtime.stop_ray)
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        print(f"dnnad: stopped by {signal.Signals(signum).name}; nothing was committed, and the same command "
              f"resumes from the partitions already written", file=sys.stderr)
        return 128 + signum
    except ConfigError as e:
        print(f"dnnad: error: {scrub(str(e), secret)}", file=sys.stderr)
        return 2
    except Exception as e:  # a full disk, a quota, a read-only or refused output: nothing was committed
        cause = io_error(e)
        if cause is None:
            raise
        print(f"dnnad: error: {scrub(failure(cause), secret)}; nothing was committed", file=sys.stderr)
        return 2
    summary = {k: record[k] for k in ("kind", "rows", "k", "threshold", "duplicates", "outputs", "timings_s")
               if k in record}
    if "summary" in record:
        summary["summary"] = {k: v for k, v in record["summary"].items() if k != "top"}
    if "warning" in record:
        summary["warning"] = record["warning"]
    if not a.quiet:
        print(scrub(json.dumps(summary, indent=2, default=str), secret))
    errors = record.get("errors", {})
    if errors.get("over_limit"):
        print(f"dnnad: error: {errors['rows']} of {errors['of']} input rows ({errors['fraction']:.1%}) are error rows, "
              f"more than --max-error-fraction {errors['limit']}; the outputs are written", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
