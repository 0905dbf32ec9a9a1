"""Sources, checked and listed on the driver before Ray starts: image folders and Parquet files/datasets of
image bytes or vectors, on a local disk or any pyarrow filesystem (s3://, gs://, file://).

``prepare_source`` fails before any work, with one line naming the flag, on anything that would fail later:
path, format, columns and their types, an empty selection, duplicate ids. Folders are listed, not read;
``read_bytes`` reads one file for a worker: regular files only and up to a size cap, so a FIFO or a device
never blocks a job. Ray-free: the read stage (``stages.read``) and the report both build on it.
"""
from __future__ import annotations

import functools
import operator
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from .config import ConfigError, SourceConfig
from .storage import resolve
from .vision.decode import IMAGE_EXTENSIONS, DecodeError

PASSTHROUGH = ("group", "label", "split")  # source columns carried unchanged to every output row
NULL_ID = "null id"


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
    """``id`` (path relative to root) and ``path`` (a URI the workers can open) of every entry with an
    image extension below ``root``, sorted by id. Entries are listed, not opened: special files and
    broken links are listed too and become error rows when read."""
    root = root.rstrip("/")
    if not isinstance(fs, pafs.LocalFileSystem):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(f.path for f in infos
                       if f.type != pafs.FileType.Directory and f.path.lower().endswith(IMAGE_EXTENSIONS))
        uris = [f"{scheme}://{p}" if scheme else p for p in paths]
        return pa.table({"id": pa.array([posixpath.relpath(p, root) for p in paths], pa.string()),
                         "path": pa.array(uris, pa.string())})
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    return pa.table({"id": pa.array([escape_name(posixpath.relpath(p, root)) for p in paths], pa.string()),
                     "path": pa.array([escape_name(p) for p in paths], pa.string())})


def escape_name(name: str) -> str:
    """A local file name (``os.fsdecode`` form) as text Arrow can hold, without loss. A name of valid UTF-8
    without a backslash is itself; in any other name each backslash is written ``\\\\`` and each byte that is
    not UTF-8 ``\\xNN`` (``caf\\xe9.jpg`` for Latin-1 ``café.jpg``), so two different names never share an id."""
    try:
        name.encode("utf-8")
        if "\\" not in name:
            return name
    except UnicodeEncodeError:  # undecodable bytes, held as lone surrogates
        pass
    return name.replace("\\", "\\\\").encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unescape_name(text: str) -> str:
    """The file name ``escape_name`` wrote (``os.fsdecode`` form, for ``open``)."""
    if "\\" not in text:
        return text
    raw = re.sub(rb"\\(\\|x[0-9a-f]{2})", lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(1)[1:], 16)]),
                 text.encode("utf-8"))
    return os.fsdecode(raw)


_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def read_bytes(uri: str, fs_cache: dict, max_bytes: int) -> bytes:
    """Bytes of a regular file (local path or pyarrow URI) of at most ``max_bytes``; anything else is a
    DecodeError whose message is the row's reason. Never opens a special file, so it never blocks."""
    scheme, sep, rest = uri.partition("://")
    scheme, path = (scheme, rest) if sep else ("", uri)  # pyarrow's path of s3://b/k is b/k
    try:
        if scheme in ("", "file"):
            path = unescape_name(path)
            st = os.stat(path)  # follows links: a link to /dev/zero is a character device
            for test, what in _SPECIAL:
                if test(st.st_mode):
                    raise DecodeError(f"not a regular file ({what})")
            size = st.st_size
            opener = lambda: open(path, "rb")  # noqa: E731
        else:
            if scheme not in fs_cache:  # one filesystem per scheme and actor, not one per file
                fs_cache[scheme] = pafs.FileSystem.from_uri(uri)[0]
            info = fs_cache[scheme].get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(path)
            if info.type != pafs.FileType.File:
                raise DecodeError("not a regular file")
            size = info.size or 0
            opener = lambda: fs_cache[scheme].open_input_stream(path)  # noqa: E731
        if size > max_bytes:
            raise DecodeError(f"file too large ({size} bytes > --max-file-bytes {max_bytes})")
        with opener() as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise DecodeError(f"file too large (> --max-file-bytes {max_bytes})")
        return data
    except FileNotFoundError:
        raise DecodeError("file not found (missing or a broken link)") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as e:
        msg = str(e)
        if "ermission denied" in msg:
            raise DecodeError("permission denied") from None
        if "No such file" in msg or "not found" in msg.lower():
            raise DecodeError("file not found (missing or a broken link)") from None
        raise DecodeError(f"read error: {msg}") from None


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


def filter_expression(schema: pa.Schema, filters: tuple[tuple[str, str], ...]) -> pc.Expression | None:
    """The ``column=value`` filters as one pyarrow expression (values cast to their column types); None if none."""
    return _all_of([pc.field(name) == pa.scalar(value, schema.field(name).type)
                    for name, value in filter_values(schema, filters)])


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
    """A source checked before any work: Parquet schema and row count, or the folder listing."""

    cfg: SourceConfig
    fs: pafs.FileSystem
    path: str
    rows: int
    schema: pa.Schema | None = None
    listing: pa.Table | None = None  # folder listing or a Parquet sample, read on the driver
    dim: int | None = None  # vector dimension of an --embedding-column source
    files: tuple[str, ...] | None = None  # a partition of a Parquet dataset: these files only


def prepare_source(cfg: SourceConfig, role: str) -> PreparedSource:
    """Fail before any work, with one line naming the flag, on anything that would fail later."""
    fs, path = resolve(cfg.uri)
    flag = f"--{role}"
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise ConfigError(f"{flag} cannot be read: {cfg.uri}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{flag} path not found: {cfg.uri}")
    if info.type == pafs.FileType.File and not path.endswith(".parquet"):
        raise ConfigError(f"{flag} must be a folder of images or a Parquet file/dataset: {cfg.uri}")
    if not is_parquet(fs, path):
        if cfg.embedding_column:
            raise ConfigError(f"--embedding-column needs a Parquet source; {cfg.uri} is a folder")
        return _prepare_folder(cfg, fs, path, flag)
    return _prepare_parquet(cfg, fs, path, flag)


def _prepare_folder(cfg: SourceConfig, fs, path: str, flag: str) -> PreparedSource:
    if cfg.filters:
        raise ConfigError(f"{flag}: row filters apply to Parquet sources only")
    if cfg.group_by and not cfg.group_by.startswith("dir:"):
        raise ConfigError("--group-by for a folder must be dir:N (the N-th folder level)")
    table = list_images(fs, path, scheme_of(cfg.uri))
    if table.num_rows == 0:
        raise ConfigError(f"{flag} folder holds no images ({', '.join(IMAGE_EXTENSIONS)}): {cfg.uri}")
    if cfg.label_column and not cfg.label_column.startswith("dir:"):
        raise ConfigError("--label-column for a folder must be dir:N (the N-th folder level: class folders are dir:1)")
    if cfg.group_by:
        table = table.append_column("group", pa.array(group_key(table["id"].to_pylist(), int(cfg.group_by[4:]))))
    if cfg.label_column:
        table = table.append_column("label", pa.array(group_key(table["id"].to_pylist(), int(cfg.label_column[4:]))))
    table = table.take(sample_positions(table.num_rows, cfg.sample))
    return PreparedSource(cfg, fs, path, table.num_rows, listing=table)


def _prepare_parquet(cfg: SourceConfig, fs, path: str, flag: str) -> PreparedSource:
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        schema = dataset.schema
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{flag} is not a readable Parquet file/dataset: {cfg.uri}: {e}") from None
    data_col, data_opt = ((cfg.embedding_column, "--embedding-column") if cfg.embedding_column
                          else (cfg.image_column, "--image-column"))
    for col, opt in ((cfg.id_column, "--id-column"), (data_col, data_opt)):
        if col not in schema.names:
            raise ConfigError(f"column {col!r} not in {cfg.uri} (columns: {', '.join(schema.names)}); set {opt}")
    data_type = schema.field(data_col).type
    dim = None
    if cfg.embedding_column:
        if not (pa.types.is_list(data_type) or pa.types.is_large_list(data_type)
                or pa.types.is_fixed_size_list(data_type)) or not (
                pa.types.is_floating(data_type.value_type) or pa.types.is_integer(data_type.value_type)):
            raise ConfigError(f"--embedding-column {data_col!r} must be a list of numbers, not {data_type}")
        dim = data_type.list_size if pa.types.is_fixed_size_list(data_type) else _first_length(dataset, data_col)
    elif not (pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type)):
        raise ConfigError(f"--image-column {data_col!r} must hold encoded image bytes (binary), not {data_type}")
    try:
        pc.cast(pa.array([], schema.field(cfg.id_column).type), pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ConfigError(f"--id-column {cfg.id_column!r} of type {schema.field(cfg.id_column).type} "
                          f"has no string form") from None
    for option, col in (("--group-by", cfg.group_by), ("--label-column", cfg.label_column)):
        if col and col.startswith("dir:") and option == "--label-column":
            raise ConfigError(f"{option} dir:N is for folders; {cfg.uri} is Parquet: name a column")
        if col and not col.startswith("dir:") and col not in schema.names:
            raise ConfigError(f"{option} column {col!r} not in {cfg.uri} (columns: {', '.join(schema.names)})")
    expr = filter_expression(schema, cfg.filters)
    try:
        n = dataset.count_rows(filter=expr)  # from the footers alone when there is no filter
        positions = sample_positions(n, cfg.sample)
        if len(positions) == 0:
            what = f" with {' and '.join(f'{c}={v}' for c, v in cfg.filters)}" if cfg.filters else ""
            raise ConfigError(f"{flag} selects no rows: {cfg.uri}{what}")
        if cfg.sample is None:
            check_unique_ids(lambda: (b.column(0) for b in dataset.to_batches(columns=[cfg.id_column], filter=expr,
                                                                              batch_size=65_536)), flag)
            return PreparedSource(cfg, fs, path, n, schema=schema, dim=dim)
        # A sample: read its rows here so that it is the same on every run and every cluster.
        keep, group_col, cols = source_columns(cfg, schema)
        picked = dataset.take(positions, columns=cols, filter=expr)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{flag} cannot be read: {cfg.uri}: {e}") from None
    check_unique_ids(lambda: iter([picked[cfg.id_column].combine_chunks()]), flag)
    return PreparedSource(cfg, fs, path, picked.num_rows, schema=schema, dim=dim,
                          listing=normalise_columns(picked, keep, group_col))


def _first_length(dataset: pads.Dataset, column: str) -> int:
    """Length of the first non-null vector of a list column: the dimension every row must have."""
    for batch in dataset.to_batches(columns=[column]):
        lengths = pc.drop_null(pc.list_value_length(batch.column(0)))
        if len(lengths):
            return int(lengths[0].as_py())
    raise ConfigError(f"--embedding-column {column!r} holds no vectors")


def check_unique_ids(batches: Callable[[], Iterable[pa.Array]], flag: str) -> None:
    """Refuse duplicate (non-null) ids: neighbour ids, kept and dropped would be ambiguous. ``batches`` gives the
    ids afresh on each call; the driver keeps 8 bytes a row (64-bit hashes), and a second pass confirms equal
    hashes on the ids themselves, so memory stays small however long the ids are."""
    from pandas.util import hash_array

    def hashes(ids: pa.Array) -> np.ndarray:
        return hash_array(np.asarray(pc.drop_null(ids).to_numpy(zero_copy_only=False)))

    h = np.concatenate([np.empty(0, np.uint64), *map(hashes, batches())])
    h.sort()
    clash = np.unique(h[1:][h[1:] == h[:-1]])
    del h
    pa.default_memory_pool().release_unused()
    if not len(clash):
        return
    ids = pa.chunked_array([pc.drop_null(b).filter(np.isin(hashes(b), clash)) for b in batches()])
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dup):
        shown = ", ".join(repr(v) for v in dup.slice(0, 3).to_pylist())
        raise ConfigError(f"{flag} has {len(dup)} duplicate ids (e.g. {shown}); ids must be unique: "
                          f"choose another --id-column")


def partitions(src: PreparedSource, rows: int) -> list[PreparedSource]:
    """The source split into deterministic partitions of about ``rows`` rows, the unit a killed run resumes
    from: slices of a folder listing or sample, or groups of whole files of a Parquet dataset."""
    if src.listing is not None:
        n = src.listing.num_rows
        return [replace(src, listing=src.listing.slice(i, rows), rows=min(rows, n - i)) for i in range(0, n, rows)]
    dataset = pads.dataset(src.path, filesystem=src.fs, format="parquet")
    groups, current, size = [], [], 0
    for frag in dataset.get_fragments():
        current.append(frag.path)
        size += frag.count_rows()
        if size >= rows:
            groups.append(tuple(current))
            current, size = [], 0
    if current or not groups:
        groups.append(tuple(current))
    return [replace(src, files=g) for g in groups]


def _all_of(terms: list):
    """AND of filter terms (pyarrow or Ray expressions); None when there are none."""
    return functools.reduce(operator.and_, terms) if terms else None


def source_columns(cfg: SourceConfig, schema: pa.Schema) -> tuple[dict[str, str], str | None, list[str]]:
    """(source column → output name, the group-by column or None, the columns to read)."""
    keep = {cfg.id_column: "id"}
    keep.update({cfg.embedding_column: "vector"} if cfg.embedding_column else {cfg.image_column: "image"})
    label = cfg.label_column if cfg.label_column and not cfg.label_column.startswith("dir:") else None
    keep.update({c: c for c in PASSTHROUGH if c in schema.names and c not in keep and c != "group"
                 and not (c == "label" and label)})
    if label:
        keep[label] = "label"
    group_col = cfg.group_by if cfg.group_by and not cfg.group_by.startswith("dir:") else None
    return keep, group_col, list(dict.fromkeys([*keep, *([group_col] if group_col else [])]))


def normalise_columns(table: pa.Table, rename: dict[str, str], group_col: str | None) -> pa.Table:
    cols = {new: table[old] for old, new in rename.items()}
    cols["id"] = pc.cast(cols["id"], pa.string())
    if group_col:
        cols["group"] = pc.cast(table[group_col], pa.string())
    return pa.table(cols)
