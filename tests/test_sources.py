"""Property-based tests of the source layer: random id/label column types, nulls, duplicates, filters, samples
and random bytes as images. Each case is either a clean one-line error before any work, or exactly one
output row per selected input row; and the source files are never changed."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnnad.config import ConfigError, SourceConfig
from dnnad.sources import prepare_source
from dnnad.stages.embed import Embedder
from dnnad.stages.read import read_source
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import resolve_weights
from tests.helpers import cifar_rows, tree_digest

ID_TYPES = {"int64": pa.int64(), "int16": pa.int16(), "string": pa.string(), "float": pa.float64(),
            "large_string": pa.large_string()}
LABEL_TYPES = {"int": pa.int32(), "string": pa.string(), "bool": pa.bool_()}


@pytest.fixture(scope="module")
def embedder():
    spec = get_spec("resnet18", 32)
    return Embedder(spec, resolve_weights(spec, "none").state_dict, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def jpegs():
    return cifar_rows("test", None, 4)["image"].to_pylist()


@st.composite
def tables(draw):
    n = draw(st.integers(0, 14))
    id_type = draw(st.sampled_from(sorted(ID_TYPES)))
    raw_ids = draw(st.lists(st.one_of(st.none(), st.integers(0, 20)), min_size=n, max_size=n))
    ids = [None if v is None else (str(v) if "string" in id_type else v) for v in raw_ids]
    label_type = draw(st.sampled_from(sorted(LABEL_TYPES)))
    raw_labels = draw(st.lists(st.one_of(st.none(), st.integers(0, 2)), min_size=n, max_size=n))
    labels = [None if v is None else {"int": v, "string": f"c{v}", "bool": bool(v % 2)}[label_type] for v in raw_labels]
    images = draw(st.lists(st.one_of(st.none(), st.integers(0, 3), st.binary(max_size=40)), min_size=n, max_size=n))
    filt = draw(st.one_of(st.none(), st.integers(0, 2)))
    sample = draw(st.one_of(st.none(), st.integers(1, 10)))
    return ids, ID_TYPES[id_type], labels, LABEL_TYPES[label_type], images, filt, sample


@pytest.mark.ray
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tables())
def test_random_tables_either_fail_early_or_give_one_row_per_selected_row(ray_local, embedder, jpegs, tmp_path, case):
    ids, id_type, labels, label_type, images, filt, sample = case
    blobs = [jpegs[v] if isinstance(v, int) else v for v in images]
    table = pa.table({"id": pa.array(ids, id_type), "label": pa.array(labels, label_type),
                      "image": pa.array(blobs, pa.binary())})
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    before = tree_digest(tmp_path)
    filters = ()
    if filt is not None:
        value = {pa.int32(): str(filt), pa.string(): f"c{filt}", pa.bool_(): str(bool(filt % 2)).lower()}[label_type]
        filters = (("label", value),)
    cfg = SourceConfig(str(path), filters=filters, sample=sample)
    selected = table
    if filters:
        cast = pa.scalar(filters[0][1]).cast(label_type)
        selected = table.filter(pc.field("label") == cast)
    n_sel = min(selected.num_rows, sample) if sample is not None else selected.num_rows
    try:
        src = prepare_source(cfg, "query")
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        if n_sel == 0:
            assert "selects no rows" in msg
        else:
            assert "duplicate ids" in msg
        assert tree_digest(tmp_path) == before
        return
    assert src.rows == n_sel
    rows = pa.Table.from_pylist(read_source(src).take_all())
    assert rows.num_rows == n_sel
    out = embedder({c: np.array(rows[c].to_pylist(), dtype=object) for c in rows.column_names})
    assert out.num_rows == n_sel
    got = out.to_pylist()
    for r in got:
        if r["id"] is None:
            assert r["status"] == "error" and r["error"] == "null id"
    non_null = [r["id"] for r in got if r["id"] is not None]
    assert len(non_null) == len(set(non_null))  # unique: duplicates were refused above
    assert {r["status"] for r in got} <= {"ok", "error"}
    assert tree_digest(tmp_path) == before


@pytest.mark.unit
def test_duplicate_ids_are_found_across_batches_and_unique_ids_pass():
    from dnnad.sources import check_unique_ids

    ids = pa.array([f"img-{i:06d}" for i in range(200_000)])
    check_unique_ids(lambda: iter([ids.slice(0, 70_000), ids.slice(70_000)]), "--query")
    dup = pa.concat_arrays([ids, pa.array(["img-000007", None, None])])
    with pytest.raises(ConfigError, match=r"--query has 1 duplicate ids \(e.g. 'img-000007'\)"):
        check_unique_ids(lambda: iter([dup.slice(0, 100), dup.slice(100)]), "--query")


@pytest.mark.unit
@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 700), group=st.integers(1, 300), files=st.integers(1, 3), keep=st.one_of(st.none(), st.integers(0, 3)))
def test_read_units_cover_every_selected_row_once_and_spread_small_sources(tmp_path_factory, n, group, files, keep):
    """Row groups whose statistics rule out the filter are never read; the rest are read as row ranges, so a
    source of a few row groups still makes ``READ_UNITS`` tasks, and together they give each selected row once."""
    import pyarrow.dataset as pads

    from dnnad.sources import filter_expression
    from dnnad.stages.read import READ_UNITS, ROWS_PER_BLOCK, read_row_groups, read_units

    root = tmp_path_factory.mktemp("units")
    for f in range(files):  # `fold` sorted within a file: row-group statistics can rule groups out
        ids = [f"{f}-{i}" for i in range(n)]
        pq.write_table(pa.table({"id": ids, "fold": pa.array(sorted(i % 4 for i in range(n)), pa.int16())}),
                       root / f"part-{f}.parquet", row_group_size=group)
    dataset = pads.dataset(str(root), format="parquet")
    filters = None if keep is None else (("fold", str(keep)),)
    expr = None if filters is None else filter_expression(dataset.schema, filters)
    units = read_units(dataset, expr, ROWS_PER_BLOCK)
    got = [i for t in read_row_groups(pa.Table.from_pylist(units), dataset.filesystem, ["id", "fold"], expr,
                                      {"id": "id"}, None, ROWS_PER_BLOCK) for i in t["id"].to_pylist()]
    expected = dataset.to_table(filter=expr)["id"].to_pylist()
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)
    groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in dataset.files)
    ranged = [u for u in units if u["stop"] > u["start"]]
    assert len(ranged) <= groups * max(1, -(-READ_UNITS // max(groups, 1)))
    if expr is None and groups and n >= READ_UNITS * ROWS_PER_BLOCK * files:
        assert len(ranged) >= READ_UNITS  # spread over enough tasks
    if keep is not None and n >= 4 * group * 2:  # a quarter of each file's groups hold the kept fold
        assert len({(u["path"], u["row_group"]) for u in ranged}) < groups


@pytest.mark.ray
def test_a_filtered_parquet_source_reaches_the_actors_in_whole_blocks(ray_local, tmp_path):
    """Where a filter keeps a few rows of each read, the embedded rows still leave the actors in blocks of a
    whole call: a source's small blocks once set the block size of every later stage, and the scoring
    actors and writer then handled blocks of ten rows (0.2x a plain loop's images/s)."""
    import ray

    from dnnad.config import DEFAULT_MAX_FILE_BYTES, EmbedConfig
    from dnnad.stages.embed import embed

    t = cifar_rows("test", None, 600)
    pq.write_table(t.append_column("fold", pa.array([i % 3 for i in range(600)], pa.int8())),
                   tmp_path / "images.parquet", row_group_size=150)
    src = prepare_source(SourceConfig(str(tmp_path / "images.parquet"), filters=(("fold", "1"),)), "query")
    cfg = EmbedConfig("resnet18", "none", 32, 64, "cpu", 1, 2, runtime="torch")
    spec = cfg.spec()
    out = embed(read_source(src), cfg, ray.put(resolve_weights(spec, "none").state_dict),
                DEFAULT_MAX_FILE_BYTES).materialize()
    sizes = [m.num_rows for bundle in out.iter_internal_ref_bundles() for m in (b.metadata for b in bundle.blocks)]
    assert sum(sizes) == 200 and sorted(out.to_pandas()["id"]) == sorted(t["id"].to_pylist()[1::3])
    assert min(sizes) >= 25 and len(sizes) <= 8, sizes  # one per read task at most, never split below it
