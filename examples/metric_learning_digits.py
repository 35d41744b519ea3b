"""Train an embedding network on scikit-learn's digits with a SoftStep metric-learning loss.

The loss is a pytorch-metric-learning loss: it takes a PML distance, reducer and miner, and
it owns learned SoftStep parameters, so it goes into the optimiser with the model.

    python examples/metric_learning_digits.py [--loss nca|contrastive|regression] [--epochs 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from simwarp.cli import non_negative_int, positive_int
from simwarp.losses import SoftStepContrastiveLoss, SoftStepNCALoss, SoftStepNeighborRegressionLoss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", choices=("nca", "contrastive", "regression"), default="contrastive")
    ap.add_argument("--epochs", type=positive_int, default=20)
    ap.add_argument("--seed", type=non_negative_int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    X, y = load_digits(return_X_y=True)  # packaged with scikit-learn, no download
    xtr, xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (torch.tensor((a - mu) / sd, dtype=torch.float32) for a in (xtr, xte))
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    if args.loss == "nca":
        loss_fn = SoftStepNCALoss(softmax_scale=8.0)
    elif args.loss == "contrastive":
        # per-anchor (a, b, t) from the anchor's embedding
        loss_fn = SoftStepContrastiveLoss(temperature=0.1, mode="instance", embedding_size=32)
    else:
        loss_fn = SoftStepNeighborRegressionLoss(softmax_scale=8.0)
    # The loss owns learned SoftStep parameters: optimise them with the model.
    opt = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=2e-3)

    for epoch in range(args.epochs):
        perm = torch.randperm(len(xtr))
        total = 0.0
        for start in range(0, len(xtr) - 63, 64):
            idx = perm[start : start + 64]
            emb = net(xtr[idx])
            target = F.one_hot(ytr[idx], 10).float() if args.loss == "regression" else ytr[idx]
            loss = loss_fn(emb, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total:.3f}  softstep({loss_fn.softstep.extra_repr()})")

    net.eval()
    with torch.no_grad():
        etr, ete = net(xtr), net(xte)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                              knn_func=CustomKNN(CosineSimilarity()))
    acc = calc.get_accuracy(ete, yte, etr, ytr, ref_includes_query=False)
    print(f"test Precision@1 {acc['precision_at_1']:.4f}  MAP@R {acc['mean_average_precision_at_r']:.4f}")


if __name__ == "__main__":
    main()
