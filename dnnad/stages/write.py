"""Write stage: scored partitions streamed to Parquet in the run's staging area (``dnnad.outputs``), each
committed by a marker, so a killed run resumes from the partitions it finished."""
from __future__ import annotations

from ..runtime import check_stopped
from ..sources import partitions

MIN_ROWS_PER_FILE = 65_536  # output rows per Parquet file (blocks are smaller: a file per block would be tiny)


def write_partitioned(run, name: str, src, scored_of) -> dict:
    """Write output ``name`` partition by partition of ``src`` (``scored_of(part)`` is the lazy scored
    dataset of one partition) into ``run.staging``; partitions a killed run committed are kept."""
    from ray.data.datasource import FilenameProvider

    parts = partitions(src, run.cfg.score.rows_per_partition(bool(src.cfg.embedding_column)))
    log = run.staging.partitions(name)
    skipped = 0
    for i, part in enumerate(parts):
        check_stopped()
        if log.done(i):
            skipped += 1
            continue
        prefix = log.start(i)
        scored_of(part).write_parquet(run.staging.path(name), filesystem=run.staging.fs,
                                      min_rows_per_file=MIN_ROWS_PER_FILE,
                                      filename_provider=FilenameProvider(dataset_uuid=prefix, file_format="parquet"))
        log.finish(i)
        check_stopped()
    log.clear_markers()
    return {"partitions": len(parts), "partitions_resumed": skipped}
