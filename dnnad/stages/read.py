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

ROWS_PER_BLOCK = 64  # image rows: one forward batch a block, so even a few hundred images reach every actor
VECTOR_ROWS_PER_BLOCK = 4096  # vector rows: a block is about one scoring batch (FAISS's 4096-query blocks)
# Logical CPUs of a read task: the embedding and scoring actors hold theirs for the whole streaming run, and
# reads must still be schedulable beside them on a small node (they are I/O, not compute). Not the scoring
# actors' 0.25: Ray Data fuses a task map into the next actor map when their resources match, and a read
# fused into a scoring actor would score a whole row group in one actor.
READ_CPUS = 0.2


def read_source(src: PreparedSource):
    """A Ray Dataset with ``id`` (string, null ids kept as nulls) and ``path`` (folders), ``image`` bytes or
    ``vector`` (Parquet), plus ``group`` when grouping and the ``label``/``split`` columns a source has.

    Blocks hold ``ROWS_PER_BLOCK`` images or ``VECTOR_ROWS_PER_BLOCK`` vectors, so a small source still reaches
    every actor. A Parquet source is read by one task per row group, page by page: no row group is ever
    whole in memory, its first block leaves at once, and no re-blocking pass copies the data again."""
    import ray.data

    if src.listing is not None:
        t = src.listing
        return ray.data.from_arrow([t.slice(i, ROWS_PER_BLOCK) for i in range(0, t.num_rows, ROWS_PER_BLOCK)])
    cfg = src.cfg
    rows = VECTOR_ROWS_PER_BLOCK if cfg.embedding_column else ROWS_PER_BLOCK
    keep, group_col, cols = source_columns(cfg, src.schema)
    cols = list(dict.fromkeys([*cols, *(name for name, _ in cfg.filters)]))  # filter columns are read, not kept
    fragments = list(pads.dataset(list(src.files) if src.files else src.path, filesystem=src.fs,
                                  format="parquet").get_fragments())
    units = [{"path": f.path, "row_group": rg.id} for f in fragments for rg in f.row_groups]
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    # Ray Data merges a task's outputs up to this size: a bit below one block, so each leaves on its own.
    ds.context.target_max_block_size = max(1, int(0.8 * rows * _bytes_per_row(fragments, cols)))
    return ds.map_batches(
        read_row_groups, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        fn_kwargs={"fs": src.fs, "columns": cols, "filters": filter_expression(src.schema, cfg.filters),
                   "rename": keep, "group_col": group_col, "rows": rows})


def _bytes_per_row(fragments: list, columns: list[str]) -> float:
    """Uncompressed Parquet bytes per row of the read columns (near their size in Arrow)."""
    size = n = 0
    for frag in fragments:
        md = frag.metadata
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            n += rg.num_rows
            size += sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                        if any(rg.column(j).path_in_schema == c or rg.column(j).path_in_schema.startswith(c + ".")
                               for c in columns))
    return size / max(n, 1)


def read_row_groups(units: pa.Table, fs: pafs.FileSystem, columns: list[str], filters: pc.Expression | None,
                    rename: dict[str, str], group_col: str | None, rows: int):
    """The selected rows of (path, row_group) units, normalised, in tables of at most ``rows`` rows."""
    for path, rg in zip(units["path"].to_pylist(), units["row_group"].to_pylist()):
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 23)
            for batch in pf.iter_batches(batch_size=rows, row_groups=[rg], columns=columns):
                table = pa.Table.from_batches([batch])
                if filters is not None:
                    table = table.filter(filters)
                if table.num_rows:
                    yield normalise_columns(table, rename, group_col)
