"""Read stage: a prepared source (``dnnad.sources``) as a Ray Dataset with ``id`` and either ``path`` (folders),
``image`` bytes or ``vector`` (Parquet), in blocks sized for the stage that follows.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..sources import PreparedSource, filter_expression, normalise_columns, source_columns

ROWS_PER_BLOCK = 64  # image rows of a folder's blocks: one forward batch a block, so a few hundred images reach every actor
VECTOR_ROWS_PER_BLOCK = 4096  # vector rows read at a time (FAISS's 4096-query blocks)
READ_UNITS = 32  # a Parquet source is read in at least this many tasks where its rows allow: every actor gets work
# Logical CPUs of a read task: the embedding and scoring actors hold theirs for the whole streaming run, and
# reads must still be schedulable beside them on a small node (they are I/O, not compute). Not the scoring
# actors' 0.25: Ray Data fuses a task map into the next actor map when their resources match, and a read
# fused into a scoring actor would score a whole row group in one actor.
READ_CPUS = 0.2


def read_source(src: PreparedSource):
    """A Ray Dataset with ``id`` (string, null ids kept as nulls) and ``path`` (folders), ``image`` bytes or
    ``vector`` (Parquet), plus ``group`` when grouping and the ``label``/``split`` columns a source has.

    A folder's blocks hold ``ROWS_PER_BLOCK`` images, so a small source still reaches every actor. A Parquet
    source is read by one task per row group (or row range, ``read_units``), page by page, one block a task:
    no re-blocking pass copies the data again."""
    import ray.data

    if src.listing is not None:
        t = src.listing
        return ray.data.from_arrow([t.slice(i, ROWS_PER_BLOCK) for i in range(0, t.num_rows, ROWS_PER_BLOCK)])
    cfg = src.cfg
    rows = VECTOR_ROWS_PER_BLOCK if cfg.embedding_column else ROWS_PER_BLOCK
    keep, group_col, cols = source_columns(cfg, src.schema)
    cols = list(dict.fromkeys([*cols, *(name for name, _ in cfg.filters)]))  # filter columns are read, not kept
    filters = filter_expression(src.schema, cfg.filters)
    units = read_units(pads.dataset(list(src.files) if src.files else src.path, filesystem=src.fs,
                                    format="parquet"), filters, rows)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    return ds.map_batches(
        read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"fs": src.fs, "columns": cols, "filters": filters, "rename": keep, "group_col": group_col,
                   "rows": rows})


def read_units(dataset: pads.Dataset, filters: pc.Expression | None, rows: int) -> list[dict]:
    """Read tasks' units: (path, row group, first row, end row). Row groups whose statistics rule out the
    filter are skipped unread; when fewer than ``READ_UNITS`` remain, each is read as row ranges of at least
    ``rows`` rows, so that a source of one row group still reaches every actor. A task's output is one block:
    Ray Data's default block size, never a limit of ours (a dataset's block-size limit holds for every later
    stage too, and small blocks there starved the embedding and scoring actors)."""
    groups = [(frag.path, rg.id, rg.num_rows) for frag in dataset.get_fragments(filter=filters)
              for part in (frag.split_by_row_group(filters) if filters is not None else [frag])
              for rg in part.row_groups]
    per_group = -(-READ_UNITS // max(1, len(groups)))
    units = []
    for path, rg, n in groups:
        parts = max(1, min(per_group, n // rows))
        bounds = [round(i * n / parts) for i in range(parts + 1)]
        units += [{"path": path, "row_group": rg, "start": a, "stop": b} for a, b in zip(bounds, bounds[1:])]
    return units or [{"path": "", "row_group": 0, "start": 0, "stop": 0}]  # nothing selected: one empty task


def read_row_groups(units: pa.Table, fs: pafs.FileSystem, columns: list[str], filters: pc.Expression | None,
                    rename: dict[str, str], group_col: str | None, rows: int):
    """The selected rows of (path, row group, row range) units, normalised, read ``rows`` rows at a time:
    no row group is ever whole in memory before its filter."""
    for path, rg, start, stop in zip(*(units[c].to_pylist() for c in ("path", "row_group", "start", "stop"))):
        if stop <= start:
            continue
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 23)
            at = 0
            for batch in pf.iter_batches(batch_size=rows, row_groups=[rg], columns=columns):
                lo, hi, at = max(start - at, 0), min(stop - at, batch.num_rows), at + batch.num_rows
                if hi <= lo:
                    if at >= stop:
                        break
                    continue
                table = pa.Table.from_batches([batch.slice(lo, hi - lo)])
                if filters is not None:
                    table = table.filter(filters)
                if table.num_rows:
                    yield normalise_columns(table, rename, group_col)
