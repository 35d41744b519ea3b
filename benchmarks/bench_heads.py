"""Benchmark of the paper's claim: a SoftStep neighbour head beats a linear head when the same
encoder is trained end to end (packaged real data, no downloads).

Heads (same encoder, same budget, same splits, early stopping on a validation split):
``linear``, ``nona`` (neighbour attention without warping, ``step="none"``), ``softstep-global``,
``softstep-instance``, ``knn`` (hard top-k on the embeddings learned by the
``softstep-instance`` run of the same seed), and ``sklearn-knn`` (scikit-learn's
``KNeighborsRegressor`` on the standardised input features, no encoder; ``n_neighbors`` and
``weights`` chosen on the validation split from :data:`SKLEARN_KNN_GRID`).

``--heads`` selects heads (default: all of the above). Step-qualified kinds
``softstep-<step>-global`` / ``softstep-<step>-instance`` (e.g. ``softstep-poly-global``) train the
same neighbour head with another registered step (``softstep-global`` is ``step="sigmoidal"``);
``knn`` needs a ``softstep-instance`` run in the same invocation. A ``raw-`` prefix
(``raw-softstep-global``, ``raw-nona``) trains that head without an encoder, on the standardised
input features: the like-for-like comparison with ``sklearn-knn`` (same features, same metric;
only the neighbour weighting differs); ``scaled-`` also learns the bandwidth (the head's
``learn_scale=True``). An ``@`` suffix starts a SoftStep head from another ``(a, b, t)``, e.g.
``softstep-poly-global@t=0.99`` (unnamed parameters keep the defaults ``0.1, 0.9, 0.5``).

Reports mean ± sd of test RMSE over seeds, the RMSE ratio to the linear head, and the paired
win rate (share of seeds where a head's test RMSE is below the linear head's).

    python benchmarks/bench_heads.py                # default: 2 seeds, short budget (< 10 min, 2 cores)
    python benchmarks/bench_heads.py --full         # 5 seeds, full budget
    python benchmarks/bench_heads.py --datasets diabetes digits --seeds 3
    python benchmarks/bench_heads.py --heads linear nona softstep-global softstep-poly-global

JSON goes to ``benchmarks/out/bench_heads.json`` (or ``--out``), rewritten after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simwarp._io import write_json  # noqa: E402
from simwarp.cli import positive_int  # noqa: E402
from simwarp.datasets import load_dataset  # noqa: E402
from simwarp.demo import (  # noqa: E402
    TrainConfig,
    knn_on_embeddings,
    split_indices,
    standardised_splits,
    train_and_evaluate,
)

REAL = ("diabetes", "boston", "diamonds", "digits", "tweets")
SYNTH = ("periodic", "hetero")
TRAINED_HEADS = ("linear", "nona", "softstep-global", "softstep-instance")
ALL_HEADS = (*TRAINED_HEADS, "knn", "sklearn-knn")
SIZES = {"diamonds": 3000, "tweets": 2000}
SKLEARN_KNN_GRID = {"n_neighbors": (1, 2, 3, 5, 8, 12, 20, 30, 50), "weights": ("uniform", "distance")}


def sklearn_knn(data, splits, cfg: TrainConfig, seed: int) -> dict:
    """scikit-learn's ``KNeighborsRegressor`` under the heads' protocol (same splits, same
    standardisation, same training rows), its two hyper-parameters picked on the validation split."""
    from sklearn.model_selection import ParameterGrid
    from sklearn.neighbors import KNeighborsRegressor

    std = standardised_splits(data, splits, cfg.max_train)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = std.train, std.val, std.test
    t0 = time.perf_counter()
    best = None
    for params in ParameterGrid(SKLEARN_KNN_GRID):
        if params["n_neighbors"] > len(ytr):
            continue
        model = KNeighborsRegressor(**params).fit(Xtr, ytr)
        val = float(np.sqrt(np.mean((model.predict(Xva) - yva) ** 2))) * std.y_scale
        if best is None or val < best[0]:
            best = (val, params, model)
    val, params, model = best
    pred = model.predict(Xte) * std.y_scale + std.y_mean
    true = yte * std.y_scale + std.y_mean
    err = pred - true
    return {"dataset": data.name, "head": "sklearn-knn", "seed": seed, "rmse": float(np.sqrt(np.mean(err**2))),
            "r2": float(1.0 - np.mean(err**2) / np.var(true)), "val_rmse": val, "params": params,
            "seconds": time.perf_counter() - t0, "kept_fraction": params["n_neighbors"] / len(ytr)}


def parse_head(kind: str) -> tuple[str, dict, str]:
    """Map a head name to ``(make_head kind, head kwargs, encoder)``; ``softstep-<step>-<mode>``
    sets ``step``, a ``raw-`` prefix drops the encoder (``TrainConfig.encoder = "none"``)."""
    from simwarp.steps import BUILTIN_STEPS, DEFAULT_A, DEFAULT_B, DEFAULT_T

    if "@" in kind:  # softstep-poly-global@t=0.99: the same head from another initial (a, b, t)
        name, _, spec = kind.partition("@")
        base, extra, encoder = parse_head(name)
        if not base.startswith("softstep-") or not spec:
            raise ValueError(f"head {kind!r}: only softstep heads take an @a=..,b=..,t=.. initialisation")
        init = dict(zip("abt", (DEFAULT_A, DEFAULT_B, DEFAULT_T)))
        for item in spec.split(","):
            key, eq, value = item.partition("=")
            if key not in init or not eq:
                raise ValueError(f"head {kind!r}: expected @a=..,b=..,t=.. (any of them), got {item!r}")
            init[key] = float(value)
        return base, {**extra, "init": (init["a"], init["b"], init["t"])}, encoder
    for prefix, scaled in (("raw-", False), ("scaled-", True)):
        if kind.startswith(prefix) and kind[len(prefix):] not in ("knn", "sklearn-knn", "linear"):
            base, extra, _ = parse_head(kind[len(prefix):])
            return base, {**extra, "learn_scale": True} if scaled else extra, "none"
    if kind in ALL_HEADS:
        return kind, {}, "mlp"
    parts = kind.split("-")
    if len(parts) == 3 and parts[0] == "softstep" and parts[2] in ("global", "instance") and parts[1] in BUILTIN_STEPS:
        return f"softstep-{parts[2]}", {"step": parts[1]}, "mlp"
    raise ValueError(f"unknown head {kind!r}: use one of {ALL_HEADS} or softstep-<step>-<global|instance> "
                     f"with step in {BUILTIN_STEPS}, each optionally prefixed raw- (no encoder) or scaled- (no "
                     "encoder, learned bandwidth)")


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        lin = {r["seed"]: r["rmse"] for r in runs if r["dataset"] == ds and r["head"] == "linear"}
        for head in dict.fromkeys(r["head"] for r in runs if r["dataset"] == ds):
            rs = [r for r in runs if r["dataset"] == ds and r["head"] == head]
            if not rs:
                continue
            rmse = np.array([r["rmse"] for r in rs])
            paired = [(r["rmse"], lin[r["seed"]]) for r in rs if r["seed"] in lin]
            wins = sum(a < b for a, b in paired)
            ratio = np.mean([a / b for a, b in paired]) if paired else float("nan")
            rows.append({
                "dataset": ds, "head": head, "n": len(rs),
                "rmse_mean": float(rmse.mean()), "rmse_sd": float(rmse.std(ddof=1)) if len(rs) > 1 else 0.0,
                "r2_mean": float(np.mean([r["r2"] for r in rs])),
                "ratio_vs_linear": float(ratio),
                "wins_vs_linear": f"{wins}/{len(paired)}" if head != "linear" else "–",
                "kept_fraction": float(np.nanmean([r["kept_fraction"] for r in rs])) if head != "linear" else float("nan"),
                "seconds": float(np.mean([r.get("seconds", 0.0) for r in rs])),
            })
    return rows


def comparison_pairs(heads) -> list[tuple[str, str]]:
    """Paired comparisons to report: ``(softstep-<step>-<mode>, softstep-<mode>)`` for every
    step-qualified head whose sigmoidal twin ran, and every trained neighbour head against
    ``sklearn-knn`` when that ran."""
    pairs = []
    for h in heads:
        base, extra, _ = parse_head(h)
        prefix = next((p for p in ("raw-", "scaled-") if h.startswith(p)), "")
        if extra.get("step", "sigmoidal") != "sigmoidal" and prefix + base in heads:
            pairs.append((h, prefix + base))
    if "sklearn-knn" in heads:
        pairs += [(h, "sklearn-knn") for h in heads if h not in ("linear", "knn", "sklearn-knn")]
    return pairs


def paired(runs: list[dict], a: str, b: str) -> list[dict]:
    """Per data set: head ``a`` vs head ``b`` on the same seeds (mean RMSE ratio a/b, wins of a, ties)."""
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        ra = {r["seed"]: r["rmse"] for r in runs if r["dataset"] == ds and r["head"] == a}
        rb = {r["seed"]: r["rmse"] for r in runs if r["dataset"] == ds and r["head"] == b}
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        ratio = np.array([ra[s] / rb[s] for s in seeds])
        rows.append({"dataset": ds, "a": a, "b": b, "n": len(seeds), "ratio_mean": float(ratio.mean()),
                     "ratio_sd": float(ratio.std(ddof=1)) if len(seeds) > 1 else 0.0,
                     "wins_a": int(sum(ra[s] < rb[s] for s in seeds)), "ties": int(sum(ra[s] == rb[s] for s in seeds))})
    return rows


def paired_markdown(rows: list[dict]) -> str:
    lines = ["| data set | head A | head B | RMSE A / B (mean ± sd over seeds) | A wins |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['a']} | {r['b']} | {r['ratio_mean']:.3f} ± {r['ratio_sd']:.3f} | "
                     f"{r['wins_a']}/{r['n']} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| data set | head | test RMSE (mean ± sd) | R² | RMSE / linear | wins vs linear | kept fraction |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "–" if np.isnan(r["kept_fraction"]) else f"{r['kept_fraction']:.2f}"
        lines.append(f"| {r['dataset']} | {r['head']} | {r['rmse_mean']:.4g} ± {r['rmse_sd']:.2g} | {r['r2_mean']:.3f} | "
                     f"{r['ratio_vs_linear']:.3f} | {r['wins_vs_linear']} | {kept} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="5 seeds and the full training budget")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default 2, --full 5)")
    p.add_argument("--datasets", nargs="+", default=None, choices=REAL + SYNTH, metavar="NAME", help=f"subset of {REAL + SYNTH} (default: the 5 real sets)")
    p.add_argument("--synthetic", action="store_true", help="also run the synthetic manifolds")
    p.add_argument("--epochs", type=positive_int, default=None, help="max epochs (default 30, --full 120)")
    p.add_argument("--patience", type=positive_int, default=None, help="early-stopping patience in epochs (default 8, --full 15)")
    p.add_argument("--max-train", type=positive_int, default=None, help="cap on training rows (default 800, --full none)")
    p.add_argument("--heads", nargs="+", default=None,
                   help=f"heads to run (default {ALL_HEADS}); also softstep-<step>-<global|instance>, e.g. softstep-poly-global")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_heads.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else (5 if args.full else 2)
    datasets = tuple(args.datasets) if args.datasets else REAL + (SYNTH if args.synthetic else ())
    heads = tuple(args.heads) if args.heads else ALL_HEADS
    for h in heads:
        try:
            parse_head(h)  # fail fast on a typo
        except ValueError as err:
            p.error(str(err))
    want_knn = "knn" in heads
    if want_knn and "softstep-instance" not in heads:
        p.error("head 'knn' needs 'softstep-instance' in --heads (it reuses that run's embeddings)")
    cfg = TrainConfig(epochs=120, patience=15) if args.full else TrainConfig(epochs=30, patience=8, max_train=800)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.patience is not None:
        cfg.patience = args.patience
    if args.max_train is not None:
        cfg.max_train = args.max_train
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "threads": args.threads,
            "torch": torch.__version__, "seeds": seeds, "full": args.full, "heads": list(heads), "config": cfg.__dict__,
            "command": " ".join(["python", "benchmarks/bench_heads.py", *(argv if argv is not None else sys.argv[1:])])}
    runs: list[dict] = []
    t0 = time.perf_counter()
    for ds in datasets:
        data = load_dataset(ds, n=SIZES.get(ds), seed=0)
        print(f"== {ds}: {data.description} ({len(data)} rows, {data.X.shape[1]} features)", flush=True)
        for seed in range(seeds):
            splits = split_indices(len(data), seed)
            for head in (h for h in heads if h not in ("knn", "sklearn-knn")):
                base, extra, encoder = parse_head(head)
                hcfg = dataclasses.replace(cfg, head_kwargs={**cfg.head_kwargs, **extra}, encoder=encoder)
                r = train_and_evaluate(data, base, hcfg, seed=seed, progress=False, splits=splits)
                r["head"] = head
                keep = {k: r[k] for k in ("dataset", "head", "seed", "rmse", "r2", "val_rmse", "epochs",
                                          "best_epoch", "seconds", "kept_fraction")}
                runs.append(keep)
                print(f"   seed {seed} {head:<18s} test RMSE {r['rmse']:.4g}  R² {r['r2']:.3f}  "
                      f"kept {r['kept_fraction']:.2f}  epochs {r['epochs']}  {r['seconds']:.1f}s", flush=True)
                if head == "softstep-instance" and want_knn:
                    k = knn_on_embeddings(r, k=10)
                    runs.append({key: k[key] for key in ("dataset", "head", "seed", "rmse", "r2", "kept_fraction")})
                    print(f"   seed {seed} {'knn (k=10)':<18s} test RMSE {k['rmse']:.4g}  R² {k['r2']:.3f}", flush=True)
            if "sklearn-knn" in heads:
                r = sklearn_knn(data, splits, cfg, seed)
                runs.append(r)
                print(f"   seed {seed} {'sklearn-knn':<18s} test RMSE {r['rmse']:.4g}  R² {r['r2']:.3f}  "
                      f"k={r['params']['n_neighbors']} weights={r['params']['weights']}", flush=True)
            rows = summarise(runs)
            pairs = [row for a, b in comparison_pairs(heads) for row in paired(runs, a, b)]
            write_json(out, {"meta": meta, "runs": runs, "summary": rows, "paired": pairs,
                             "elapsed_s": time.perf_counter() - t0})
    rows = summarise(runs)
    print()
    print(markdown(rows))
    pairs = [row for a, b in comparison_pairs(heads) for row in paired(runs, a, b)]
    if pairs:
        print()
        print(paired_markdown(pairs))
    print(f"\nelapsed {time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
