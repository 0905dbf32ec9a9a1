"""The rank job's one-file HTML report: the most anomalous rows beside their neighbours, the largest
near-duplicate groups side by side, and the label suspects beside the neighbours that out-voted them.
Reads the written ``ranking`` and ``duplicates`` tables (only the rows it shows) and thumbnails from the source."""
from __future__ import annotations

import html
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .html import thumbnail_uri
from .images import fetch_images

SHOWN = 20  # rows, groups and suspects shown per section


def figure(uri: str | None, caption: str, cls: str = "") -> str:
    return (f'<figure><img class="{cls}" src="{uri or ""}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def rank_report(record: dict, fs, ranking_path: str, duplicates_path: str | None, source, top: int = SHOWN) -> str:
    ranking = pads.dataset(ranking_path, format="parquet", filesystem=fs)
    names = ranking.schema.names
    ok = pc.field("status") == "ok"
    outliers = ranking.to_table(filter=ok & (pc.field("rank") <= top)).sort_by("rank").to_pylist()
    suspects = []
    if "suspect" in names:
        t = ranking.to_table(columns=["id", "label", "suggested_label", "label_agreement", "label_score", "voter_ids",
                                      "neighbor_labels"],
                             filter=ok & (pc.field("suspect") == pa.scalar(True)))
        suspects = t.sort_by([("label_score", "descending"), ("id", "ascending")]).slice(0, top).to_pylist()
    groups = []
    if duplicates_path is not None:
        d = pads.dataset(duplicates_path, format="parquet", filesystem=fs).to_table()
        if d.num_rows:
            firsts = d.group_by(["group_id", "group_size"]).aggregate([]).sort_by(
                [("group_size", "descending"), ("group_id", "ascending")]).slice(0, top)
            keep = d.filter(pc.is_in(d["group_id"], value_set=firsts["group_id"])).to_pylist()
            for g in firsts["group_id"].to_pylist():
                groups.append([r for r in keep if r["group_id"] == g])
    wanted = [r["id"] for r in outliers] + [n for r in outliers for n in r["neighbor_ids"]]
    wanted += [m["id"] for g in groups for m in g[:8]] + [i for r in suspects for i in [r["id"], *r["voter_ids"][:6]]]
    images = fetch_images(source, wanted)
    thumb = lambda i: thumbnail_uri(images.get(i))  # noqa: E731
    out_rows = "".join(
        '<div class="row">' + figure(thumb(r["id"]), f'#{r["rank"]} {r["id"]} score {r["score"]:.3f}', "query")
        + "".join(figure(thumb(n), f"{n} d={d:.3f}") for n, d in zip(r["neighbor_ids"], r["neighbor_dists"]))
        + "</div>" for r in outliers if r["score"] is not None)
    dup_rows = "".join(
        f'<div class="row"><span class="tag">group {g[0]["group_id"]}: {g[0]["group_size"]} images</span>'
        + "".join(figure(thumb(m["id"]), f'{m["id"]} d={m["distance"]:.3f}') for m in g[:8]) + "</div>"
        for g in groups)
    sus_rows = "".join(
        '<div class="row">' + figure(thumb(r["id"]), f'{r["id"]}: filed {r["label"]}, suggested {r["suggested_label"]}',
                                     "query")
        + f'<span class="tag">label agreement {r["label_agreement"]:.2f}</span>'
        + "".join(figure(thumb(v), f"{v}: {lab}") for v, lab in zip(r["voter_ids"][:6], r["neighbor_labels"]))
        + "</div>" for r in suspects)
    dups, labels = record.get("duplicates", {}), record.get("labels", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dnnad rank report</title><style>
body{{font-family:sans-serif;margin:24px;color:#222}} .row{{display:flex;gap:8px;margin:6px 0;align-items:flex-start}}
figure{{margin:0;width:110px;font-size:11px;word-break:break-all}} img{{width:96px;image-rendering:pixelated;
border:2px solid #ddd}} img.query{{border-color:#d33}} .tag{{font-size:12px;width:160px}}
pre{{background:#f6f6f6;padding:12px;overflow:auto}}</style></head><body>
<h1>dnnad rank report</h1>
<p>rows {html.escape(json.dumps(record.get("rows", {})))}; kept {record.get("kept")}, dropped {record.get("dropped")};
duplicate groups {dups.get("groups", "off")} (largest {dups.get("largest_group", "-")});
label suspects {labels.get("suspects", "off")}.</p>
<h2 id="outliers">Top {len(outliers)} outliers and their nearest neighbours</h2>{out_rows}
<h2 id="duplicates">Largest near-duplicate groups ({len(groups)} shown)</h2>{dup_rows or "<p>none</p>"}
<h2 id="suspects">Images under the wrong label? ({len(suspects)} shown)</h2>{sus_rows or "<p>none</p>"}
<h2>Run record</h2><pre id="record">{html.escape(json.dumps(record, indent=2, default=str))}</pre>
</body></html>"""
