"""A SoftStep neighbour head as a drop-in for nn.Linear (scikit-learn's bundled diabetes data).

    python examples/neighbor_head.py

Trains an MLP encoder end to end with a NeighborRegressionHead (leave-one-out inside each
batch), stores the training set as the bank, predicts the test set with uncertainty, explains
one prediction, and round-trips the trained head (with its bank) through torch.save.
"""

from __future__ import annotations

import argparse
import io

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn

import simwarp

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
torch.manual_seed(0)
X, y = load_diabetes(return_X_y=True)
X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
y = torch.tensor(y, dtype=torch.float32)
perm = torch.randperm(len(y))
tr, te = perm[:350], perm[350:]

encoder = nn.Sequential(nn.Linear(10, 64), nn.GELU(), nn.Linear(64, 16))
head = simwarp.NeighborRegressionHead(16, 1, metric="l2", step="sigmoidal", mode="instance")
opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3)

for _epoch in range(40):
    encoder.train()
    head.train()
    for idx in tr[torch.randperm(len(tr))].split(64):
        if len(idx) < 2:  # leave-one-out needs a neighbour
            continue
        loss = F.mse_loss(head(encoder(X[idx]), y[idx]), y[idx])  # targets in their own units
        opt.zero_grad()
        loss.backward()
        opt.step()

encoder.eval()
head.eval()
head.fit_bank(encoder, [(X[tr], y[tr])], progress=False)  # or head.set_bank(encoder(X[tr]), y[tr])
with torch.no_grad():
    z = encoder(X[te])
    mean, var = head.predict_with_uncertainty(z)
    rmse = (mean.squeeze(-1) - y[te]).pow(2).mean().sqrt()
    idx, w = head.explain(z[:1], k=5)
print(f"test RMSE {rmse:.2f}, mean predictive sd {var.sqrt().mean():.2f}, kept fraction {head.sparsity['kept_fraction']:.2f}")
print(f"first test row: top-5 bank rows {idx[0].tolist()} with weights {[round(x, 3) for x in w[0].tolist()]}")
print(f"learned step for that row: { {k: round(float(v[0]), 3) for k, v in head.step_params(z[:1]).items()} }")

buf = io.BytesIO()
torch.save(head.state_dict(), buf)
buf.seek(0)
restored = simwarp.NeighborRegressionHead(16, 1).eval()
restored.load_state_dict(torch.load(buf))  # the bank comes back with the weights
with torch.no_grad():
    assert torch.allclose(restored(z), mean)
print(f"restored head with a bank of {restored.bank_size} rows predicts identically")
