"""One-class CIFAR-10 with the offline pretrained default backbone: far above chance (paper protocol, subsampled)."""
import json

import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from dnnad.cli import main
from tests.helpers import CIFAR

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # the pretrained Lite2 on 1,500 images


def test_one_class_cifar10_automobile_auroc(ray_local, tmp_path):
    """Fit on 500 train automobiles, score 1,000 test images: ROC AUC with automobile as normal."""
    out = tmp_path / "out"
    assert main(["score", "--normal", str(CIFAR), "--normal-filter", "split=train", "--normal-filter", "label=1",
                 "--normal-sample", "500", "--query", str(CIFAR), "--query-filter", "split=test",
                 "--query-sample", "1000", "--out", str(out), "--backbone", "efficientnet_lite2", "--quiet"]) == 0
    t = pq.read_table(out / "scores")
    assert t.num_rows == 1000 and set(t["status"].to_pylist()) == {"ok"}
    anomalous = [int(label != 1) for label in t["label"].to_pylist()]
    auroc = roc_auc_score(anomalous, t["score"].to_numpy())
    print(f"CIFAR-10 automobile AUROC (lite2, 500 normal, 1000 test): {auroc:.4f}")
    assert auroc > 0.85
    record = json.loads((out / "run.json").read_text())
    assert record["weights"] == "imagenet" and "efficientnet-lite2" in record["weights_identity"]
