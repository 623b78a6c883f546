"""The one inference loop, and what is measured with it: held-out accuracy, frozen features, kNN.

:func:`inference` runs a model over every image of a dataset once (eval mode, no gradients, the
run's precision, each DDP rank its own share); :func:`evaluate`, :func:`extract_features` and
through them :func:`knn_accuracy` and ``openmae embed`` are built on it, so every evaluation shards
the images over the ranks and sums the results, and gives the same numbers on 1 or N processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from openmae.data import Batch, ImageDataset, collate
from openmae.distributed import DistInfo, all_reduce_sum
from openmae.runtime import Runtime

TOPK = (1, 5)


def eval_loader(dataset: ImageDataset, batch_size: int, dist: DistInfo, num_workers: int = 0) -> DataLoader:
    """Every image once, in index order, rank r taking indices r, r + W, ... (nothing dropped)."""
    dataset.set_epoch(0)
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, collate_fn=collate)


def inference(
    model: nn.Module,
    dataset: ImageDataset,
    forward: Callable[[nn.Module, Tensor], Tensor],
    runtime: Runtime | None = None,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    label: str = "inference",
) -> Iterator[tuple[Batch, Tensor]]:
    """``(batch, forward(model, images))`` for this rank's share of ``dataset``, in index order.

    Runs without gradients, in eval mode (the model's mode is restored afterwards) and under the
    runtime's autocast; batches whose images all failed to decode are skipped.
    """
    runtime = runtime or Runtime()
    was_training = model.training
    model.eval()
    batches: Any = eval_loader(dataset, batch_size, runtime.dist, num_workers)
    if progress and runtime.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, desc=label, unit="batch", dynamic_ncols=True, leave=False)
    try:
        for batch in batches:
            if len(batch) == 0:
                continue
            with torch.no_grad(), runtime.autocast():
                out = forward(model, batch.images.to(runtime.device))
            yield batch, out
    finally:
        model.train(was_training)


def topk_correct(logits: Tensor, labels: Tensor, topk: Sequence[int] = TOPK) -> list[int]:
    """How many rows have their label among the k highest scores, for each k (capped at the class count)."""
    kmax = min(max(topk), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top == labels.unsqueeze(1)
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in topk]


def evaluate(model: nn.Module, dataset: ImageDataset, runtime: Runtime | None = None, **loop: Any) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of a classifier on a labelled dataset.

    ``loop``: :func:`inference`'s ``batch_size``, ``num_workers``, ``progress``.
    Returns ``{"top1", "top5", "loss", "images"}``; the same on 1 or N processes.
    """
    runtime = runtime or Runtime()
    totals = torch.zeros(2 + len(TOPK), dtype=torch.float64)  # images, loss sum, correct@k...
    for batch, logits in inference(model, dataset, lambda m, x: m(x), runtime, label="evaluate", **loop):
        labels = batch.labels.to(runtime.device)
        logits = logits.float()
        totals[0] += len(labels)
        totals[1] += float(F.cross_entropy(logits, labels, reduction="sum"))
        totals[2:] += torch.tensor(topk_correct(logits, labels), dtype=torch.float64)
    totals = all_reduce_sum(totals.to(runtime.device), runtime.dist).cpu()
    n = max(float(totals[0]), 1.0)
    out = {f"top{k}": round(100.0 * float(c) / n, 4) for k, c in zip(TOPK, totals[2:])}
    return {**out, "loss": float(totals[1]) / n, "images": int(totals[0])}


def pooled_features(model: nn.Module, images: Tensor, pool: str = "token") -> Tensor:
    """(N, C, H, W) -> (N, D): a classifier's pre-logits, or an MAE's cls / mean patch token
    after its final norm (its deterministic, unmasked ``encode``)."""
    if hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    if not hasattr(model, "encode"):
        raise TypeError(f"{type(model).__name__} has no encode(images); features need a ViT encoder")
    tokens = model.encode(images)  # (N, P + L, D): P prefix (cls) tokens, then the patch tokens
    prefix = model.num_prefix_tokens
    if pool == "token":
        if prefix == 0:
            raise ValueError(f"{type(model).__name__} has no cls token: pool 'avg' instead of 'token'")
        return tokens[:, 0]
    return tokens[:, prefix:].mean(dim=1)


def extract_features(
    model: nn.Module, dataset: ImageDataset, runtime: Runtime | None = None, *, pool: str = "token", **loop: Any
) -> tuple[Tensor, Tensor]:
    """Features of every image of ``dataset``, row i for dataset index i, on every rank.

    Returns (features (N, D) float32, ok (N,) bool); ``ok`` is False for files that failed to
    decode (their row is zero). Deterministic: eval mode, fixed order and batches.
    """
    runtime = runtime or Runtime()
    n = len(dataset)
    features: Tensor | None = None
    ok = torch.zeros(n, dtype=torch.float32)
    dim = getattr(model, "embed_dim", None)
    if dim is not None:
        features = torch.zeros(n, dim)
    forward = lambda m, x: pooled_features(m, x, pool)  # noqa: E731
    for batch, f in inference(model, dataset, forward, runtime, label="features", **loop):
        if features is None:
            features = torch.zeros(n, f.shape[1])
        features[batch.indices] = f.float().cpu()
        ok[batch.indices] = 1.0
    if features is None:
        raise ValueError("no image of the dataset could be decoded")
    if runtime.dist.enabled:  # rows are disjoint across ranks: a sum gathers them
        features = all_reduce_sum(features.to(runtime.device), runtime.dist).cpu()
        ok = all_reduce_sum(ok.to(runtime.device), runtime.dist).cpu()
    return features, ok > 0


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN votes (Wu et al. 2018, as DINO's monitor): each of the k most cosine-similar
    training images votes for its class with weight exp(similarity / temperature).

    Args:
        train_features: (M, D); train_labels: (M,) int in [0, num_classes); test_features: (N, D).
    Returns:
        (N, num_classes) summed votes, to rank like logits.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = torch.zeros(test.shape[0], num_classes)
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T  # (n, M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores[start : start + chunk] = votes
    return scores


def knn_accuracy(
    model: nn.Module,
    train: ImageDataset,
    test: ImageDataset,
    runtime: Runtime | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "token",
    **loop: Any,
) -> dict[str, float]:
    """Top-1 / top-5 (%) of weighted kNN on frozen features, training split as the memory bank."""
    f_train, ok_train = extract_features(model, train, runtime, pool=pool, **loop)
    f_test, ok_test = extract_features(model, test, runtime, pool=pool, **loop)
    y_train = torch.as_tensor(train.labels)[ok_train]
    y_test = torch.as_tensor(test.labels)[ok_test]
    scores = knn_classify(f_train[ok_train], y_train, f_test[ok_test], train.num_classes, k, temperature)
    n = max(len(y_test), 1)
    return {f"top{kk}": round(100.0 * c / n, 4) for kk, c in zip(TOPK, topk_correct(scores, y_test))} | {
        "images": len(y_test),
        "memory": len(y_train),
    }
