"""`simwarp demo`: the same encoder trained with a linear head and with a SoftStep head.

Also the training loop shared with ``benchmarks/bench_heads.py``: :func:`train_and_evaluate`
trains ``encoder + head`` end to end with Adam, early stopping on a validation split, and
reports test RMSE / R² in the targets' units plus the head's kept fraction.

Protocol (identical for every head): features standardised with the training split's
mean/std; targets standardised with the training split's mean/std for the optimiser (all
heads see the same loss scale) and mapped back for the metrics; neighbour heads predict
validation and test rows from a bank of the training rows' embeddings.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simwarp._io import write_json
from simwarp.datasets import RegressionData, load_dataset
from simwarp.heads import KNNRegressionHead, make_head

__all__ = ["TrainConfig", "StandardisedSplits", "make_encoder", "split_indices", "standardised_splits", "train_and_evaluate", "knn_on_embeddings", "run_demo"]


@dataclass
class TrainConfig:
    """Budget and architecture shared by every head in a comparison."""

    epochs: int = 120
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-5
    patience: int = 20
    hidden: int = 128
    emb_dim: int = 32
    max_train: int | None = None
    head_kwargs: dict = field(default_factory=dict)
    #: ``"mlp"`` (:func:`make_encoder`) or ``"none"``: the head sees the standardised features
    #: (a neighbour head on a fixed metric, as scikit-learn's ``KNeighborsRegressor``; give it
    #: ``head_kwargs={"learn_scale": True}`` for a learned bandwidth)
    encoder: str = "mlp"


def make_encoder(in_features: int, hidden: int = 128, emb_dim: int = 32) -> nn.Module:
    """The shared encoder: a 3-layer MLP ``in_features → hidden → hidden → emb_dim``."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, emb_dim)
    )


def split_indices(n: int, seed: int, val: float = 0.15, test: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random train / validation / test index split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test)), int(round(n * val))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


@dataclass(frozen=True)
class StandardisedSplits:
    """Train / validation / test ``(X, y)`` arrays standardised with the training split's statistics.

    ``y`` is standardised too (``(y - y_mean) / y_scale``); map predictions back with
    ``pred * y_scale + y_mean`` before computing metrics in the targets' units.
    """

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    y_mean: float
    y_scale: float


def standardised_splits(
    data: RegressionData, splits: tuple[np.ndarray, np.ndarray, np.ndarray], max_train: int | None = None
) -> StandardisedSplits:
    """The protocol every head (and every baseline) of a comparison sees: the first ``max_train``
    training rows, features and targets standardised with those rows' mean and standard deviation."""
    tr, va, te = splits
    if max_train is not None:
        tr = tr[:max_train]
    X, y = data.X, data.y
    mu, sd = X[tr].mean(0), X[tr].std(0)
    # a feature constant over the training rows (a pixel blank in all of them) keeps its scale:
    # divided by ~0, its values in the other rows became ~1e6 and broke the linear baseline
    sd = np.where(sd > 0, sd + 1e-6, 1.0)
    ymu, ysd = float(y[tr].mean()), float(y[tr].std() + 1e-12)

    def part(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (X[idx] - mu) / sd, (y[idx] - ymu) / ysd

    return StandardisedSplits(part(tr), part(va), part(te), ymu, ysd)


def _metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    err = pred - true
    rmse = float(np.sqrt(np.mean(err**2)))
    var = float(np.var(true))
    return {"rmse": rmse, "r2": float(1.0 - np.mean(err**2) / var) if var > 0 else float("nan")}


@torch.no_grad()
def _embed(encoder: nn.Module, X: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    return torch.cat([encoder(X[i : i + batch]) for i in range(0, X.shape[0], batch)]) if X.shape[0] else X[:, :0]


@torch.no_grad()
def _predict(encoder: nn.Module, head: nn.Module, X: torch.Tensor, bank: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    encoder.eval()
    head.eval()
    if bank is not None and hasattr(head, "set_bank"):
        head.set_bank(_embed(encoder, bank[0]), bank[1])
    z = _embed(encoder, X)
    return head(z).reshape(-1)


def train_and_evaluate(
    data: RegressionData,
    head_kind: str,
    cfg: TrainConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train ``make_encoder + make_head(head_kind)`` with early stopping; evaluate on test.

    Returns a dict with ``rmse``, ``r2`` (test, targets' units), ``val_rmse``, ``kept_fraction``
    (neighbour heads, on the test predictions), ``epochs``, ``seconds``, ``pred``/``true``
    arrays (test), and the trained ``encoder``/``head`` plus the tensors used (for kNN, plots).
    """
    device = torch.device(device)
    std = standardised_splits(data, splits if splits is not None else split_indices(len(data), seed), cfg.max_train)
    ymu, ysd = std.y_mean, std.y_scale
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (
        (torch.as_tensor(X, device=device), torch.as_tensor(y, device=device))
        for X, y in (std.train, std.val, std.test)
    )
    torch.manual_seed(seed)
    if cfg.encoder not in ("mlp", "none"):
        raise ValueError(f"TrainConfig.encoder must be 'mlp' or 'none', got {cfg.encoder!r}")
    if cfg.encoder == "mlp" and head_kind == "knn":
        raise ValueError(
            "head_kind='knn' cannot train an encoder (a top-k average has no gradient): train one with another "
            "head and rank its embeddings with knn_on_embeddings, or use TrainConfig(encoder='none')"
        )
    if cfg.encoder == "mlp":
        encoder, emb_dim = make_encoder(data.X.shape[1], cfg.hidden, cfg.emb_dim).to(device), cfg.emb_dim
    else:
        encoder, emb_dim = nn.Identity(), data.X.shape[1]
    head = make_head(head_kind, emb_dim, 1, **cfg.head_kwargs).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    # nothing to learn (no encoder and a parameter-free head, e.g. step="none"): evaluate as is
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if params else None
    gen = torch.Generator().manual_seed(seed)
    best = (float("inf"), None, 0)
    bad = 0
    t0 = time.perf_counter()
    n = Xtr.shape[0]
    bs = min(cfg.batch_size, n)
    epochs = range(cfg.epochs if opt is not None else 0)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.epochs, desc=f"{data.name:>9s} | {head_kind:<17s}", leave=True, dynamic_ncols=True)
        except ImportError:
            bar = None
    epoch = 0
    for epoch in epochs:
        encoder.train()
        head.train()
        perm = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n - bs + 1, bs):  # drop_last: every batch has >= 2 rows for leave-one-out
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            pred = head(encoder(Xtr[idx]), ytr[idx])
            loss = F.mse_loss(pred, ytr[idx])
            loss.backward()
            opt.step()
        val = float(torch.sqrt(F.mse_loss(_predict(encoder, head, Xva, (Xtr, ytr)), yva))) * ysd
        if val < best[0] - 1e-6:
            best = (val, (copy.deepcopy(encoder.state_dict()), copy.deepcopy(head.state_dict())), epoch + 1)
            bad = 0
        else:
            bad += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val_rmse=f"{val:.4g}", best=f"{best[0]:.4g}")
        if bad >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    if opt is None:  # nothing to train: evaluated as is
        val = float(torch.sqrt(F.mse_loss(_predict(encoder, head, Xva, (Xtr, ytr)), yva))) * ysd
        best = (val, (copy.deepcopy(encoder.state_dict()), copy.deepcopy(head.state_dict())), 0)
        epoch = -1
    if best[1] is None:
        raise RuntimeError(f"{head_kind} on {data.name}: training diverged (every validation RMSE was NaN)")
    encoder.load_state_dict(best[1][0])
    head.load_state_dict(best[1][1])
    pred = _predict(encoder, head, Xte, (Xtr, ytr)).cpu().numpy() * ysd + ymu
    true = yte.cpu().numpy() * ysd + ymu
    res: dict[str, Any] = {"head": head_kind, "dataset": data.name, "seed": seed, **_metrics(pred, true)}
    res["val_rmse"] = best[0]
    res["epochs"] = epoch + 1
    res["best_epoch"] = best[2]
    res["seconds"] = time.perf_counter() - t0
    sp = getattr(head, "sparsity", {})
    res["kept_fraction"] = sp.get("kept_fraction", float("nan")) if sp else float("nan")
    res.update(pred=pred, true=true, encoder=encoder, emb_dim=emb_dim, head_module=head, tensors=(Xtr, ytr, Xte, yte),
               y_scale=(ymu, ysd))
    return res


def knn_on_embeddings(trained: dict[str, Any], k: int = 10, metric: str = "l2") -> dict[str, Any]:
    """Hard top-k kNN on the embeddings learned by another run (same split, same encoder)."""
    Xtr, ytr, Xte, yte = trained["tensors"]
    ymu, ysd = trained["y_scale"]
    enc = trained["encoder"].eval()
    knn = KNNRegressionHead(trained["emb_dim"], 1, k=k, metric=metric).to(Xtr.device)
    pred = _predict(enc, knn, Xte, (Xtr, ytr)).cpu().numpy() * ysd + ymu
    true = yte.cpu().numpy() * ysd + ymu
    return {"head": "knn", "dataset": trained["dataset"], "seed": trained["seed"], **_metrics(pred, true),
            "kept_fraction": min(k, Xtr.shape[0]) / Xtr.shape[0], "pred": pred, "true": true}


# ---------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------

DEMO_DATASETS = ("digits", "periodic")
DEFAULT_SOFTSTEP = "softstep-instance"


def _plot(results: dict[str, dict[str, dict]], out_png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        from simwarp.datasets import MissingExtraError

        raise MissingExtraError("the demo's plot needs matplotlib: pip install 'simwarp[data]'") from err
    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 4 * len(names)), squeeze=False)
    u = torch.linspace(0, 1, 201)
    for row, name in enumerate(names):
        for col, kind in enumerate(("linear", DEFAULT_SOFTSTEP)):
            r = results[name][kind]
            ax = axes[row, col]
            ax.scatter(r["true"], r["pred"], s=6, alpha=0.5)
            lo, hi = float(np.min(r["true"])), float(np.max(r["true"]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_title(f"{name}: {kind}\nRMSE {r['rmse']:.3g}, R² {r['r2']:.2f}", fontsize=10)
            ax.set_xlabel("true")
            ax.set_ylabel("predicted")
        ax = axes[row, 2]
        r = results[name][DEFAULT_SOFTSTEP]
        head = r["head_module"]
        if getattr(head, "softstep", None) is not None:
            Xte = r["tensors"][2]
            with torch.no_grad():
                z = _embed(r["encoder"], Xte[:40])
                curves = head.softstep.curve(u.to(z.dtype), z if head.mode == "instance" else None)
            curves = curves.reshape(-1, u.numel()).cpu().numpy()
            for c in curves:
                ax.plot(u.numpy(), c, color="C1", alpha=0.3, lw=1)
            ax.set_title(f"{name}: learned SoftStep m(u)\n({head.mode} mode, {curves.shape[0]} test queries)", fontsize=10)
        ax.set_xlabel("normalised similarity u")
        ax.set_ylabel("mask m(u)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], console_print) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    headers = ["dataset", "head", "test RMSE", "R²", "kept fraction", "epochs", "seconds"]  # kept: share of neighbours with weight > 0
    cells = [
        [r["dataset"], r["head"], f"{r['rmse']:.4g}", f"{r['r2']:.3f}",
         "-" if np.isnan(r["kept_fraction"]) else f"{r['kept_fraction']:.2f}", str(r["epochs"]), f"{r['seconds']:.1f}"]
        for r in rows
    ]
    if Console is not None:
        table = Table(title="simwarp demo: same encoder, linear head vs SoftStep head")
        for h in headers:
            table.add_column(h, justify="left" if h in ("dataset", "head") else "right", no_wrap=True)
        for c in cells:
            table.add_row(*c)
        console = Console()
        Console(width=max(console.width, 110)).print(table)
    else:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        console_print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for c in cells:
            console_print("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)))


def run_demo(
    datasets: tuple[str, ...] = DEMO_DATASETS,
    quick: bool = False,
    out: str | Path = "simwarp-demo",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    print_fn=print,
) -> dict[str, Any]:
    """Train linear and SoftStep heads on ``datasets``; print the table, write PNG + JSON.

    Returns ``{"rows": [...], "png": path, "json": path}``.
    """
    if isinstance(datasets, str):
        datasets = (datasets,)

    # Each head trains until its validation RMSE stops improving: a fixed short budget would
    # compare convergence speed (neighbour heads converge in fewer epochs), not the fits.
    cfg = TrainConfig(epochs=150, patience=20, max_train=400) if quick else TrainConfig(epochs=400, patience=40)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)  # before training: a path that cannot be made fails now
    results: dict[str, dict[str, dict]] = {}
    rows = []
    for name in datasets:
        data = load_dataset(name, n=700 if quick else None, seed=seed, progress=progress)
        print_fn(f"{name}: {data.description} ({len(data)} rows, {data.X.shape[1]} features)")
        splits = split_indices(len(data), seed)
        results[name] = {}
        for kind in ("linear", DEFAULT_SOFTSTEP):
            r = train_and_evaluate(data, kind, cfg, seed=seed, device=device, progress=progress, splits=splits)
            results[name][kind] = r
            rows.append({k: r[k] for k in ("dataset", "head", "rmse", "r2", "kept_fraction", "epochs", "seconds")})
    _table(rows, print_fn)
    png = out / "demo.png"
    _plot(results, png)
    js = out / "demo.json"
    # NaN (no kept fraction for the linear head, R² of a constant target) is written as null
    write_json(js, {"config": asdict(cfg), "seed": seed, "quick": quick, "rows": rows})
    for name in datasets:
        lin, ss = results[name]["linear"]["rmse"], results[name][DEFAULT_SOFTSTEP]["rmse"]
        print_fn(f"{name}: SoftStep head test RMSE {ss:.4g} vs linear {lin:.4g} (ratio {ss / lin:.2f})")
    print_fn(f"wrote {png.resolve()} (predicted vs true, learned step curves) and {js.resolve()}")
    return {"rows": rows, "png": str(png), "json": str(js)}
