"""A one-file static HTML report of a run: score histogram with the threshold, ROC curve when labels are
present, the top-N anomalies beside their nearest normal images, and the run record. No network needed."""
from __future__ import annotations

import base64
import html
import io
import json

import numpy as np

ONE_AT_A_TIME = {"batch_readahead": 0, "fragment_readahead": 0}  # scans hold one batch, not Arrow's read-ahead


def thumbnail_uri(data: bytes | None, size: int = 96) -> str | None:
    from ..vision.decode import DecodeError, decode_image

    try:
        img = decode_image(data)
    except DecodeError:
        return None
    img.thumbnail((size, size))
    img = img.resize((size, size * img.height // max(1, img.width))) if img.width < size else img
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def svg_histogram(scores: np.ndarray, normal: np.ndarray | None, threshold: float, w: int = 640, h: int = 220) -> str:
    """Histogram of this run's scores (blue) and the normal set's leave-one-out scores (grey)."""
    allv = np.concatenate([scores, normal if normal is not None else [], [threshold]])
    lo, hi = float(allv.min()), float(max(allv.max(), threshold)) * 1.02
    edges = np.linspace(lo, hi, 41)
    parts = []
    series = [(c, v, a) for c, v, a in (("#999", normal, 0.5), ("#2a6fdb", scores, 0.7)) if v is not None and len(v)]
    peak = max(np.histogram(v, edges)[0].max() / len(v) for _, v, _ in series)
    for colour, values, alpha in series:
        counts = np.histogram(values, edges)[0] / len(values)
        for i, c in enumerate(counts):
            x, bw, bh = 40 + (w - 50) * i / 40, (w - 50) / 40, (h - 40) * c / peak
            parts.append(f'<rect x="{x:.1f}" y="{h - 20 - bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" '
                         f'fill="{colour}" fill-opacity="{alpha}"/>')
    tx = 40 + (w - 50) * (threshold - lo) / (hi - lo)
    parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="10" y2="{h - 20}" stroke="#d33" stroke-width="2"/>')
    parts.append(f'<text x="{tx + 4:.1f}" y="20" fill="#d33" font-size="12">threshold {threshold:.3g}</text>')
    parts.append(f'<text x="40" y="{h - 4}" font-size="11">{lo:.3g}</text>'
                 f'<text x="{w - 60}" y="{h - 4}" font-size="11">{hi:.3g}</text>')
    return f'<svg id="histogram" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def svg_roc(y: np.ndarray, scores: np.ndarray, size: int = 260) -> tuple[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, scores)
    pts = " ".join(f"{20 + (size - 30) * a:.1f},{size - 20 - (size - 30) * b:.1f}" for a, b in zip(fpr, tpr))
    auc = float(roc_auc_score(y, scores))
    return (f'<svg id="roc" width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">'
            f'<rect x="20" y="10" width="{size - 30}" height="{size - 30}" fill="none" stroke="#ccc"/>'
            f'<line x1="20" y1="{size - 20}" x2="{size - 10}" y2="10" stroke="#ccc" stroke-dasharray="4"/>'
            f'<polyline points="{pts}" fill="none" stroke="#2a6fdb" stroke-width="2"/>'
            f'<text x="30" y="{size - 28}" font-size="12">ROC AUC {auc:.4f}</text></svg>'), auc


def percentile_note(p: float | None) -> str:
    return "" if p is None else f"<br>above {p:.1f}% of normal"


def heatmap_figure(r: dict, data: bytes | None, image_size: int | None, threshold: float,
                   border: list | None = None) -> str:
    """A top row's anomaly map over its image (``--localize``), or nothing."""
    if not r.get("anomaly_map") or not image_size:
        return ""
    from .heatmap import heatmap_uri

    uri = heatmap_uri(data, r["anomaly_map"], r["map_height"], r["map_width"], image_size, threshold,
                      (r["peak_x"], r["peak_y"]), border=border)
    return (f'<figure class="map"><img class="heatmap" src="{uri or ""}" alt="anomaly map of {html.escape(r["id"])}">'
            f'<figcaption>anomaly map; peak at ({r["peak_x"]}, {r["peak_y"]})</figcaption></figure>')


def render(record: dict, scores: np.ndarray, normal_scores: np.ndarray | None, threshold: float,
           top: list[dict], images: dict[str, bytes], normal_images: dict[str, bytes],
           labels_anomalous: np.ndarray | None = None, image_size: int | None = None,
           border: list | None = None) -> str:
    """The report as one HTML string; ``top`` rows carry id, score, neighbor_ids, neighbor_dists (and with
    ``--localize`` their anomaly_map, map_height, map_width, peak_x, peak_y: shown over the image at the
    model's ``image_size``, border-calibrated by ``border`` as it was scored)."""
    roc = ""
    if labels_anomalous is not None and 0 < labels_anomalous.sum() < len(labels_anomalous):
        svg, auc = svg_roc(labels_anomalous, scores)
        roc = f"<h2>ROC curve (labels present)</h2>{svg}"
    cards = []
    for r in top:
        thumbs = [f'<figure><img class="query" src="{thumbnail_uri(images.get(r["id"])) or ""}" '
                  f'alt="{html.escape(r["id"])}"><figcaption>{html.escape(r["id"])}<br>score {r["score"]:.3f}'
                  f'{percentile_note(r.get("normal_percentile"))}</figcaption></figure>'
                  + heatmap_figure(r, images.get(r["id"]), image_size, threshold, border)]
        for nid, nd in zip(r["neighbor_ids"], r["neighbor_dists"]):
            uri = thumbnail_uri(normal_images.get(nid)) or ""
            thumbs.append(f'<figure><img class="neighbor" src="{uri}" alt="{html.escape(nid)}">'
                          f'<figcaption>{html.escape(nid)}<br>d={nd:.3f}</figcaption></figure>')
        cards.append(f'<div class="row">{"".join(thumbs)}</div>')
    rows = record.get("rows", {})
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dnnad report</title><style>
body{{font-family:sans-serif;margin:24px;color:#222}} .row{{display:flex;gap:8px;margin:6px 0;align-items:flex-start}}
figure{{margin:0;width:110px;font-size:11px;word-break:break-all}} img{{width:96px;image-rendering:pixelated;
border:2px solid #ddd}} img.query{{border-color:#d33}} figure.map{{width:170px}} img.heatmap{{width:160px;
image-rendering:auto}} pre{{background:#f6f6f6;padding:12px;overflow:auto}}
</style></head><body>
<h1>dnnad run report</h1>
<p>{html.escape(str(record.get("kind", "")))} run finished {html.escape(str(record.get("finished_at", "")))}:
{html.escape(", ".join(f"{v} {k}" for k, v in rows.items()))}; k={html.escape(str(record.get("k")))};
threshold {threshold:.4g};
{int(np.sum(scores > threshold))} of {len(scores)} scored rows flagged.</p>
<h2>Score distribution</h2><p>blue: this run; grey: the normal set's leave-one-out scores; red: threshold</p>
{svg_histogram(scores, normal_scores, threshold)}
{roc}
<h2>Top {len(top)} anomalies and their nearest normal images</h2>
{"".join(cards)}
<h2>Run record</h2><pre id="record">{html.escape(json.dumps(record, indent=2, default=str))}</pre>
<script>addEventListener("load", () => {{ document.body.dataset.imagesLoaded =
  [...document.images].filter(i => i.complete && i.naturalWidth > 0).length; }});</script>
</body></html>"""


def run_report(record: dict, fs, scores_path: str, model, query_source, top_n: int = 20) -> str:
    """The report of a written scores table against a fitted model. Streams only the columns it plots (the
    driver keeps a float per scored row and the running top-N) and fetches thumbnails for the rows it shows,
    from this run's query source and the model's normal source."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from .images import fetch_images

    dataset = pads.dataset(scores_path, format="parquet", filesystem=fs)
    normal_labels = set(model.meta.normal_labels or ())
    with_labels = "label" in dataset.schema.names and bool(normal_labels)
    order = [("score", "descending"), ("id", "ascending")]
    scores, labels, best = [], [], None
    for batch in dataset.to_batches(columns=["id", "score"] + (["label"] if with_labels else []),
                                    filter=pc.field("status") == "ok", batch_size=65_536, **ONE_AT_A_TIME):
        scores.append(batch.column(1).to_numpy(zero_copy_only=False))
        if with_labels:
            labels.append([int(v is not None and str(v) not in normal_labels) for v in batch.column(2).to_pylist()])
        rows = pa.Table.from_batches([batch]).select(["id", "score"])
        best = (rows if best is None else pa.concat_tables([best, rows])).sort_by(order).slice(0, top_n)
    top_ids = best["id"] if best is not None else pa.array([], pa.string())
    shown = ["id", "score", "normal_percentile", "neighbor_ids", "neighbor_dists"]
    if "anomaly_map" in dataset.schema.names:
        shown += ["anomaly_map", "map_height", "map_width", "peak_x", "peak_y"]
    top = pa.Table.from_batches(dataset.to_batches(columns=shown, filter=pc.field("id").isin(top_ids), **ONE_AT_A_TIME),
                                schema=pa.schema([dataset.schema.field(c) for c in shown])).sort_by(order).to_pylist()
    images = fetch_images(query_source, [r["id"] for r in top])
    normal_src = model.meta.normal_source
    normal_images = fetch_images(normal_src, [n for r in top for n in r["neighbor_ids"]]) if normal_src else {}
    scores = np.concatenate([np.empty(0), *scores])
    labels = np.concatenate([np.empty(0, int), *map(np.asarray, labels)]) if with_labels else None
    return render(record, scores, model.calibration_scores, model.threshold, top, images,
                  normal_images, labels, model.meta.image_size if model.meta.localize else None,
                  model.meta.border_calibration)
