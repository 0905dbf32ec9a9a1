"""The report's thumbnails: encoded bytes of the few rows it shows, read only from this run's sources."""
from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..config import SourceConfig
from ..sources import is_parquet, read_bytes
from ..storage import resolve
from ..vision.decode import DecodeError

THUMBNAIL_MAX_BYTES = 32 * 1024 * 1024


def source_config(source: SourceConfig | dict) -> SourceConfig:
    if isinstance(source, SourceConfig):
        return source
    return SourceConfig(**{k: tuple(map(tuple, v)) if k == "filters" else v for k, v in source.items()})


def fetch_images(source: SourceConfig | dict, ids: list[str]) -> dict[str, bytes]:
    """Encoded bytes of a few rows by id; unreadable ones, and ids that would leave a folder source's
    root (absolute paths, ``..``), are left out."""
    cfg = source_config(source)
    if cfg.embedding_column:
        return {}  # a source of vectors has no images to show
    fs, path = resolve(cfg.uri)
    wanted = [i for i in dict.fromkeys(ids) if isinstance(i, str)]
    if not is_parquet(fs, path):
        root = posixpath.normpath(path.rstrip("/") or "/")
        scheme = cfg.uri.split("://", 1)[0] if "://" in cfg.uri else ""
        out, fs_cache = {}, {}
        for i in wanted:
            full = posixpath.normpath(posixpath.join(root, i))
            if posixpath.isabs(i) or not full.startswith(root.rstrip("/") + "/"):
                continue
            try:
                out[i] = read_bytes(f"{scheme}://{full}" if scheme else full, fs_cache, THUMBNAIL_MAX_BYTES)
            except DecodeError:
                pass
        return out
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    id_type = dataset.schema.field(cfg.id_column).type
    try:
        keys = pc.cast(pa.array(wanted, pa.string()), id_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return {}
    t = dataset.to_table(columns=[cfg.id_column, cfg.image_column], filter=pc.field(cfg.id_column).isin(keys))
    ids_str = pc.cast(t[cfg.id_column], pa.string()).to_pylist()
    return {i: b for i, b in zip(ids_str, t[cfg.image_column].to_pylist()) if b}
