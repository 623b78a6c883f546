"""``openmae knn``: weighted kNN classification on frozen features, a quick check of an encoder."""

from __future__ import annotations

import sys
import time
from typing import Any

from openmae.commands import accuracy_summary
from openmae.config import check_output_dir, to_dict
from openmae.eval_config import KNNConfig

DESCRIPTION = (
    "Classify the held-out split by a weighted vote of its k nearest training images (cosine similarity of frozen "
    "features, weights exp(sim / T)); writes OUTPUT/metrics.json."
)
EXAMPLES = """examples:
  openmae knn --checkpoint runs/pretrain                 # Fashion-MNIST: 60k memory bank, 10k queries
  openmae knn --model vit_micro_patch4                   # the default architecture at random initialisation
  openmae knn --checkpoint mae_pretrain_vit_base.pth --data /datasets/imagenet --img-size 224 --knn.crop_pct 0.875
"""


def run_knn(cfg: KNNConfig) -> dict[str, Any]:
    """kNN top-1 / top-5 (%) on the held-out split; also written to ``metrics.json``."""
    from pathlib import Path

    from openmae.data import labelled_splits
    from openmae.distributed import barrier
    from openmae.engine import seed_everything, write_run_files
    from openmae.inference import knn_accuracy
    from openmae.interop.classifier import build_feature_model, read_encoder
    from openmae.runs import write_metrics
    from openmae.runtime import Runtime
    from openmae.transforms import eval_transform

    check_output_dir(cfg.run.output_dir, "run.output_dir")
    start = time.perf_counter()
    runtime = Runtime.create(cfg.run.device, cfg.run.precision)
    weights = read_encoder(cfg.model.checkpoint)
    train, test = labelled_splits(cfg.data, cfg.run.seed, "knn", cfg.knn.crop_pct)
    # the memory bank is encoded like the queries, without augmentation
    train.transform = eval_transform(cfg.data.img_size, train.mean, train.std, cfg.knn.crop_pct)
    seed_everything(cfg.run.seed)
    model = build_feature_model(cfg.model, weights, img_size=cfg.data.img_size, in_chans=train.channels)
    if model.load_report is not None and runtime.is_main:
        print(model.load_report.summary(), file=sys.stderr)
    model = model.to(runtime.device)
    result = knn_accuracy(
        model, train, test, runtime, k=cfg.knn.k, temperature=cfg.knn.temperature, pool=cfg.model.global_pool,
        batch_size=cfg.knn.batch_size, num_workers=cfg.data.num_workers, progress=cfg.run.progress,
    )
    metrics = {
        "protocol": "knn",
        **result,
        "k": cfg.knn.k,
        "temperature": cfg.knn.temperature,
        "checkpoint": cfg.model.checkpoint,
        "model": model.arch,
        "pool": model.global_pool,  # what "auto" resolved to
        "dataset": cfg.data.path or cfg.data.name,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if runtime.is_main:
        config = to_dict(cfg)
        config["data"]["mean"], config["data"]["std"] = list(train.mean), list(train.std)
        write_run_files(Path(cfg.run.output_dir), config, runtime.dist)
        write_metrics(cfg.run.output_dir, metrics)
    barrier(runtime.dist)
    return metrics


def run(cfg: KNNConfig) -> str:
    return accuracy_summary(f"knn (k={cfg.knn.k})", run_knn(cfg), cfg.run.output_dir)
