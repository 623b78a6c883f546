"""A quick look at what an MAE encoder learned on Fashion-MNIST (docs/learning.md).

Frozen features of the first N training and M test images; kNN (k 20, T 0.07, cosine, openmae's
``knn_classify``) and logistic regression (scikit-learn, standardised features) on the cls token,
the mean patch token and both together. Faster than the full protocols, for screening recipes.

    python benchmarks/feature_probe.py raw                              # raw pixels
    python benchmarks/feature_probe.py runs/pretrain                    # a run folder or file
    python benchmarks/feature_probe.py random:mae_vit_micro_patch4      # random initialisation
    python benchmarks/feature_probe.py runs/pretrain --analyse          # per-patch loss, feature rank
    python benchmarks/feature_probe.py runs/pretrain --blocks           # every block's tokens
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

import openmae
from openmae.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, _fashion_mnist
from openmae.inference import knn_classify


def load_split(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    source = _fashion_mnist(None, split, limit)
    images = torch.tensor(source.images).float()[:, None] / 255  # (N, 1, 28, 28)
    return (images - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0], torch.tensor(source.labels)


def logistic_regression(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_train.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop at max_iter; the budget is the same for every row
        clf = LogisticRegression(max_iter=300).fit(scaler.transform(f_train.numpy()), y_train.numpy())
    return 100.0 * float((clf.predict(scaler.transform(f_test.numpy())) == y_test.numpy()).mean())


def knn(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor) -> float:
    return 100.0 * float((knn_classify(f_train, y_train, f_test, 10).argmax(1) == y_test).float().mean())


def report(name: str, f_train, y_train, f_test, y_test, with_logreg: bool = True) -> None:
    line = f"{name:<34} kNN {knn(f_train, y_train, f_test, y_test):6.2f}"
    if with_logreg:
        line += f"   logistic regression {logistic_regression(f_train, y_train, f_test, y_test):6.2f}"
    print(line, flush=True)


def effective_rank(features: torch.Tensor) -> float:
    s = torch.linalg.svdvals(features - features.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


@torch.no_grad()
def analyse(model, images: torch.Tensor) -> None:
    """Masked-patch loss against the trivial flat prediction, on flat and textured patches."""
    torch.manual_seed(0)
    tokens = model.encode(images)
    cls = tokens[:, 0]
    out = model(images, mask_ratio=0.75)
    target = model.target(images)
    per_patch = ((out.pred - target) ** 2).mean(-1)  # (N, L)
    flat_prediction = (target**2).mean(-1)  # predicting 0, the mean normalised patch
    flat = model.patchify(images).std(-1) < 1e-3
    removed = out.mask.bool()
    print(f"effective rank of the cls features: {effective_rank(cls):.1f} of {cls.shape[1]}")
    print(f"squared norm of the mean unit cls feature: {F.normalize(cls, dim=1).mean(0).norm() ** 2:.3f}")
    print(f"removed patches: loss {per_patch[removed].mean():.3f} (flat prediction {flat_prediction[removed].mean():.3f})")
    print(
        f"  flat ones ({flat[removed].float().mean():.0%}): {per_patch[removed & flat].mean():.3f}; "
        f"textured: {per_patch[removed & ~flat].mean():.3f} (flat prediction {flat_prediction[removed & ~flat].mean():.3f})"
    )


@torch.no_grad()
def block_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """(depth, N, L, D): every block's patch tokens, layer-normalised without affine."""
    chunks = []
    for start in range(0, len(images), 1000):
        x = model.with_cls(model.embed_patches(images[start : start + 1000]))
        per_block = []
        for block in model.blocks:
            x = block(x)
            per_block.append(F.layer_norm(x[:, model.num_prefix_tokens :], x.shape[-1:]))
        chunks.append(torch.stack(per_block))
    return torch.cat(chunks, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", help="raw, random:MODEL, or an MAE run folder / file")
    parser.add_argument("--train", type=int, default=10000, help="training images (memory bank, regression fit)")
    parser.add_argument("--test", type=int, default=5000, help="test images")
    parser.add_argument("--analyse", action="store_true", help="per-patch loss and feature statistics")
    parser.add_argument("--blocks", action="store_true", help="probe every block's mean and flattened tokens")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x_train, y_train = load_split("train", args.train)
    x_test, y_test = load_split("test", args.test)
    if args.encoder == "raw":
        report("raw pixels", x_train.flatten(1), y_train, x_test.flatten(1), y_test)
        return
    if args.encoder.startswith("random:"):
        torch.manual_seed(0)
        model = openmae.create_model(args.encoder.split(":", 1)[1])
    else:
        model = openmae.load_pretrained(args.encoder)
    model.eval()
    if args.analyse:
        analyse(model, x_test[:2000])
        return
    if args.blocks:
        b_train, b_test = block_tokens(model, x_train), block_tokens(model, x_test)
        for i in range(len(b_train)):
            report(f"block {i + 1} mean token", b_train[i].mean(1), y_train, b_test[i].mean(1), y_test)
            report(f"block {i + 1} all tokens", b_train[i].flatten(1), y_train, b_test[i].flatten(1), y_test, False)
        return
    with torch.no_grad():
        t_train = torch.cat([model.encode(x_train[i : i + 1000]) for i in range(0, len(x_train), 1000)])
        t_test = torch.cat([model.encode(x_test[i : i + 1000]) for i in range(0, len(x_test), 1000)])
    p = model.num_prefix_tokens
    report("cls token", t_train[:, 0], y_train, t_test[:, 0], y_test)
    report("mean patch token", t_train[:, p:].mean(1), y_train, t_test[:, p:].mean(1), y_test)
    both = lambda t: torch.cat([t[:, 0], t[:, p:].mean(1)], dim=1)  # noqa: E731
    report("cls + mean patch token", both(t_train), y_train, both(t_test), y_test)


if __name__ == "__main__":
    main()
