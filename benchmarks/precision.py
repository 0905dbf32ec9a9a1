"""Lower precision on CPU, measured: images/s of the forward pass and mean one-class ROC AUC side by side with
fp32, on CIFAR-10 and Fashion-MNIST.

    python benchmarks/precision.py --backbone efficientnet_lite2 --train-per-class 200 --test-n 2000

Precisions (``throughput.forward_runners``): ONNX Runtime fp32 (what the jobs run), OpenVINO bf16 (its own
default on CPUs with bf16), ONNX Runtime int8 (static QDQ, per channel, calibrated on 256 train images of the
dataset). A precision could become a default only if the mean ROC AUC moves by less than 0.002.
The read-out is the jobs' default: final pooled features, L2-normalised, k = 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import DATASETS, git_rev, machine, subsample, write_results
from sklearn.metrics import roc_auc_score
from throughput import forward_runners

from dnnad import DN2
from dnnad.stages.embed import CPU_FORWARD_PIXELS
from dnnad.vision.decode import decode_image
from dnnad.vision.preprocess import crop_fn, normalize_batch
from dnnad.vision.specs import get_spec
from dnnad.vision.weights import resolve_weights

PRECISIONS = {"fp32": "ONNX Runtime fp32", "bf16": "OpenVINO bf16", "int8": "ONNX Runtime int8 (static QDQ)"}


def embed_all(run, images: list[bytes], spec, chunk: int) -> tuple[np.ndarray, float]:
    """Embeddings of ``images`` and the forward pass's images/s (decode and crop not counted)."""
    crop, out, forward = crop_fn(spec), [], 0.0
    for i in range(0, len(images), 64):
        x = normalize_batch(spec, np.stack([crop(decode_image(b)) for b in images[i:i + 64]]))
        t0 = time.perf_counter()
        out += [np.asarray(run(x[j:j + chunk])) for j in range(0, len(x), chunk)]
        forward += time.perf_counter() - t0
    return np.concatenate(out).astype(np.float32), len(images) / forward


def mean_auroc(X: np.ndarray, labels: np.ndarray, split: np.ndarray, k: int) -> float:
    test = split == "test"
    aucs = []
    for c in np.unique(labels[split == "train"]):
        model = DN2(k=k, normalize="l2").fit(X[(split == "train") & (labels == c)])
        aucs.append(roc_auc_score(labels[test] != c, model.anomaly_score(X[test])))
    return float(np.mean(aucs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="cifar10,fashion-mnist")
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--k", type=int, default=2)
    a = ap.parse_args()
    spec = get_spec(a.backbone, a.image_size)
    state = resolve_weights(spec, "imagenet").state_dict
    chunk = max(1, min(64, CPU_FORWARD_PIXELS // spec.image_size ** 2))
    lines = [f"## Lower precision on CPU: {a.backbone} @{spec.image_size}px ({dt.date.today()}, commit {git_rev()})",
             "", f"- command: `python benchmarks/precision.py --datasets {a.datasets} --backbone {a.backbone} "
             f"--train-per-class {a.train_per_class} --test-n {a.test_n}`",
             f"- machine: {machine()}; {a.threads} threads; forward passes in chunks of {chunk}; read-out: final "
             f"features, L2-normalised, k = {a.k}", "",
             "| dataset | precision | forward img/s | vs fp32 | mean one-class ROC AUC | change vs fp32 | "
             "max rel diff of the embedding |", "|---|---|---|---|---|---|---|"]
    for dataset in a.datasets.split(","):
        rows = subsample(dataset, a.train_per_class, a.test_n, 0)
        t = pq.read_table(DATASETS[dataset], columns=["id", "image"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(rows["id"].to_pylist())))
        by_id = dict(zip(t["id"].to_pylist(), t["image"].to_pylist()))
        images = [by_id[i] for i in rows["id"].to_pylist()]
        labels, split = rows["label"].to_numpy(), rows["split"].to_numpy(zero_copy_only=False)
        crop = crop_fn(spec)
        train = [b for b, s in zip(images, split) if s == "train"]
        calib = normalize_batch(spec, np.stack([crop(decode_image(b)) for b in train[::max(1, len(train) // 256)][:256]]))
        runners = forward_runners(spec, state, a.threads, calib)
        ref = None
        for short, name in PRECISIONS.items():
            if name not in runners:
                lines.append(f"| {dataset} | {short} | — | — | not available on this CPU | — | — |")
                continue
            X, rate = embed_all(runners[name], images, spec, chunk)
            auc = mean_auroc(X, labels, split, a.k)
            if ref is None:
                ref = (X, rate, auc)
            diff = float(np.abs(X - ref[0]).max() / np.abs(ref[0]).max())
            lines.append(f"| {dataset} | {short} ({name}) | {rate:.1f} | {rate / ref[1]:.2f}x | {auc:.4f} | "
                         f"{auc - ref[2]:+.4f} | {diff:.1e} |")
            print(lines[-1], flush=True)
    write_results(f"precision-{a.backbone}", lines)


if __name__ == "__main__":
    main()
