"""Nightly audit: the cache embeds only new images, partitions are dated and queryable, the report renders."""
import json
import re
import shutil
import subprocess

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dnnad.cli import main
from tests.helpers import FAST, make_corpus

pytestmark = pytest.mark.ray
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def nights(ray_local, corpus, tmp_path_factory):
    """A model, then two audit nights over a corpus that grew by one image (1 %)."""
    root = tmp_path_factory.mktemp("audit")
    model = root / "model"
    assert main(["score", "--normal", str(corpus.normal), "--query", str(corpus.normal),
                 "--out", str(root / "fit"), "--model", str(model), *FAST]) == 0
    corpus_dir = make_corpus(root / "corpus", query=100, bad=["broken.jpg"]).query
    out = root / "audits"
    base = ["audit", "--model", str(model), "--query", str(corpus_dir), "--out", str(out), "--top", "5", *FAST]
    assert main([*base, "--date", "2026-11-28"]) == 0
    make_corpus(root / "corpus", query=1, query_offset=500)  # tonight's single new image
    assert main([*base, "--date", "2026-11-29"]) == 0
    return out, base


def test_second_night_embeds_only_the_new_image(nights):
    out, _ = nights
    first = json.loads((out / "runs" / "2026-11-28.json").read_text())
    second = json.loads((out / "runs" / "2026-11-29.json").read_text())
    assert first["rows"] == {"ok": 100, "error": 1} and second["rows"] == {"ok": 101, "error": 1}
    assert (first["summary"]["embedded"], first["summary"]["from_cache"]) == (100, 0)
    assert (second["summary"]["embedded"], second["summary"]["from_cache"]) == (1, 100)
    a = pq.read_table(out / "scores" / "run_date=2026-11-28").sort_by("id")
    b = pq.read_table(out / "scores" / "run_date=2026-11-29").sort_by("id")
    common = set(a["id"].to_pylist())
    b_common = b.filter(pc.is_in(b["id"], value_set=pa.array(sorted(common))))
    assert a["score"].to_pylist() == b_common["score"].to_pylist()  # cached embeddings score identically


def test_summary_has_counts_distribution_top_and_drift(nights):
    out, _ = nights
    s = json.loads((out / "runs" / "2026-11-29.json").read_text())["summary"]
    assert len(s["top"]) == 5 and s["top"][0]["score"] >= s["top"][-1]["score"]
    assert set(s["score_quantiles"]) == {"0.5", "0.9", "0.99"} and s["normal_loo_quantiles"]
    assert s["drift"]["previous_run_date"] == "2026-11-28" and 0 <= s["drift"]["ks_statistic"] <= 1


def test_rerunning_a_night_needs_overwrite(nights, capsys):
    _, base = nights
    assert main([*base, "--date", "2026-11-29"]) == 2
    assert "already holds a finished run" in capsys.readouterr().err


def test_partitions_are_readable_by_pandas_and_duckdb(nights):
    out, _ = nights
    df = pd.read_parquet(out / "scores")
    assert sorted(df["run_date"].astype(str).unique()) == ["2026-11-28", "2026-11-29"] and len(df) == 101 + 102
    top = duckdb.sql(f"""
        SELECT id, score, neighbor_ids FROM read_parquet('{out}/scores/*/*.parquet', hive_partitioning = true)
        WHERE run_date = '2026-11-29' AND status = 'ok' ORDER BY score DESC LIMIT 5""").fetchall()
    summary_top = json.loads((out / "runs" / "2026-11-29.json").read_text())["summary"]["top"]
    assert [r[0] for r in top] == [r["id"] for r in summary_top]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_with_all_thumbnails(nights, tmp_path):
    out, _ = nights
    report = out / "reports" / "2026-11-29.html"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    n_images = len(re.findall(r"<img ", dom))
    assert n_images == 5 * 3  # five anomalies, each beside its k=2 nearest normal images
    assert f'data-images-loaded="{n_images}"' in dom  # every thumbnail decoded and drawn
    assert 'id="histogram"' in dom and "threshold" in dom and 'id="record"' in dom
