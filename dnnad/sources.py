"""Image sources as Ray Datasets with columns ``id`` and either ``path`` or ``image`` (bytes).

Folders are listed (not read) on the driver; bytes are read and decoded by the embedding workers.
Local paths and pyarrow-filesystem URIs (s3://, gs://, file://) go through the same code.
"""
from __future__ import annotations

import functools
import operator
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from .config import ConfigError, SourceConfig
from .decode import IMAGE_EXTENSIONS

ROWS_PER_BLOCK = 256


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), uri


def is_parquet(fs: pafs.FileSystem, path: str) -> bool:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return path.endswith(".parquet")
    files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    return bool(files) and all(f.path.endswith(".parquet") or posixpath.basename(f.path).startswith(("_", "."))
                               for f in files)


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri and not uri.startswith("file://") else ""


def list_images(fs: pafs.FileSystem, root: str, scheme: str = "") -> pa.Table:
    """``id`` (path relative to root) and ``path`` (a URI the workers can open) of every file with
    an image extension below ``root``, sorted by id."""
    root = root.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        # os.walk also lists broken symlinks, which pyarrow's selector drops: they must become error rows.
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(f.path for f in infos
                       if f.type != pafs.FileType.Directory and f.path.lower().endswith(IMAGE_EXTENSIONS))
    uris = [f"{scheme}://{p}" if scheme else p for p in paths]
    return pa.table({"id": [posixpath.relpath(p, root) for p in paths], "path": uris})


def filter_values(schema: pa.Schema, filters: tuple[tuple[str, str], ...]) -> list[tuple[str, object]]:
    """Each ``column=value`` filter with the value cast to its column's type; unknown columns raise."""
    out = []
    for col, value in filters:
        if col not in schema.names:
            raise ConfigError(f"filter column {col!r} not in the Parquet schema ({', '.join(schema.names)})")
        try:
            out.append((col, pa.scalar(value).cast(schema.field(col).type).as_py()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ConfigError(f"filter value {value!r} does not fit column {col!r} of type "
                              f"{schema.field(col).type}") from None
    return out


def sample_positions(n: int, size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted positions of a fixed-seed random sample of ``size`` out of ``n`` rows (all when None or >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def group_key(ids: list[str], level: int) -> list[str]:
    """Folder-level group key: the ``level``-th directory component of each relative id."""
    parts = [i.split("/") for i in ids]
    return ["/".join(p[:level]) if len(p) > level else "" for p in parts]


@dataclass(frozen=True)
class PreparedSource:
    """A source checked before any work: Parquet schema, or the folder listing (id, path[, group])."""

    cfg: SourceConfig
    fs: pafs.FileSystem
    path: str
    schema: pa.Schema | None = None
    listing: pa.Table | None = None


def prepare_source(cfg: SourceConfig, role: str) -> PreparedSource:
    """Fail before any work on a missing path, an empty folder or an unknown column."""
    fs, path = resolve(cfg.uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ConfigError(f"--{role} path not found: {cfg.uri}")
    if not is_parquet(fs, path):
        if cfg.filters:
            raise ConfigError("--filter applies to Parquet sources only")
        if cfg.group_by and not cfg.group_by.startswith("dir:"):
            raise ConfigError("--group-by for a folder must be dir:N (the N-th folder level)")
        table = list_images(fs, path, scheme_of(cfg.uri))
        if table.num_rows == 0:
            raise ConfigError(f"--{role} folder holds no images ({', '.join(IMAGE_EXTENSIONS)}): {cfg.uri}")
        if cfg.group_by:
            table = table.append_column("group", pa.array(group_key(table["id"].to_pylist(), int(cfg.group_by[4:]))))
        return PreparedSource(cfg, fs, path, listing=table.take(sample_positions(table.num_rows, cfg.sample)))
    schema = pads.dataset(path, filesystem=fs, format="parquet").schema
    for col in (cfg.id_column, cfg.image_column):
        if col not in schema.names:
            raise ConfigError(f"column {col!r} not in {cfg.uri} (columns: {', '.join(schema.names)}); "
                              f"set --id-column/--image-column")
    if cfg.group_by and not cfg.group_by.startswith("dir:") and cfg.group_by not in schema.names:
        raise ConfigError(f"--group-by column {cfg.group_by!r} not in {cfg.uri}")
    values = filter_values(schema, cfg.filters)
    if cfg.sample is None:
        return PreparedSource(cfg, fs, path, schema=schema)
    # A sample: read its rows here so that it is the same on every run and every cluster.
    expr = _all_of([pc.field(name) == pa.scalar(value, schema.field(name).type) for name, value in values])
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    keep, group_col, cols = _columns(cfg, schema)
    picked = dataset.take(sample_positions(dataset.count_rows(filter=expr), cfg.sample), columns=cols, filter=expr)
    table = _normalise_columns(picked, keep, group_col)
    if table.num_rows == 0:
        raise ConfigError(f"--{role} selects no rows: {cfg.uri} {dict(cfg.filters)}")
    return PreparedSource(cfg, fs, path, schema=schema, listing=table)


def read_source(src: PreparedSource):
    """A Ray Dataset with ``id`` and ``path`` (folders) or ``image`` bytes (Parquet), plus ``group``
    when grouping and the ``label``/``split`` columns when a Parquet file has them."""
    import ray.data
    from ray.data.expressions import col

    if src.listing is not None:
        t = src.listing
        return ray.data.from_arrow([t.slice(i, ROWS_PER_BLOCK) for i in range(0, t.num_rows, ROWS_PER_BLOCK)])
    cfg, schema = src.cfg, src.schema
    ds = ray.data.read_parquet(src.path, filesystem=src.fs)
    expr = _all_of([col(name) == value for name, value in filter_values(schema, cfg.filters)])
    if expr is not None:
        ds = ds.filter(expr=expr)
    keep, group_col, cols = _columns(cfg, schema)
    ds = ds.select_columns(cols)
    ds = ds.map_batches(_normalise_columns, batch_format="pyarrow",
                        fn_kwargs={"rename": keep, "group_col": group_col})
    return ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK)


def _all_of(terms: list):
    """AND of filter terms (pyarrow or Ray expressions); None when there are none."""
    return functools.reduce(operator.and_, terms) if terms else None


def _columns(cfg: SourceConfig, schema: pa.Schema) -> tuple[dict[str, str], str | None, list[str]]:
    """(source column → output name, the group-by column or None, the columns to read)."""
    keep = {cfg.id_column: "id", cfg.image_column: "image"}
    keep.update({c: c for c in ("label", "split") if c in schema.names and c not in keep})
    group_col = cfg.group_by if cfg.group_by and not cfg.group_by.startswith("dir:") else None
    return keep, group_col, list(dict.fromkeys([*keep, *([group_col] if group_col else [])]))


def _normalise_columns(table: pa.Table, rename: dict[str, str], group_col: str | None) -> pa.Table:
    cols = {new: table[old] for old, new in rename.items()}
    cols["id"] = pc.cast(cols["id"], pa.string())
    if group_col:
        cols["group"] = pc.cast(table[group_col], pa.string())
    return pa.table(cols)


def fetch_images(source: dict, ids: list[str]) -> dict[str, bytes]:
    """Encoded bytes of a few rows by id (report thumbnails); unreadable ones are left out."""
    cfg = SourceConfig(**{k: tuple(map(tuple, v)) if k == "filters" else v for k, v in source.items()})
    fs, path = resolve(cfg.uri)
    wanted = list(dict.fromkeys(ids))
    if not is_parquet(fs, path):
        out = {}
        for i in wanted:
            try:
                with fs.open_input_stream(posixpath.join(path.rstrip("/"), i)) as f:
                    out[i] = f.read()
            except OSError:
                pass
        return out
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    t = dataset.to_table(columns=[cfg.id_column, cfg.image_column],
                         filter=pc.field(cfg.id_column).isin(pa.array(wanted, dataset.schema.field(cfg.id_column).type)))
    return {str(i): b for i, b in zip(t[cfg.id_column].to_pylist(), t[cfg.image_column].to_pylist()) if b}
