"""simwarp.distributed on real process groups: 2 and 4 CPU processes (gloo, loopback FileStore).

One process group per world size runs every distributed computation once (module-scoped
fixture) and saves each rank's results; the tests compare them with single-process results
computed here (values in float64, and gradients of the local parts).
"""

from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import simwarp
from simwarp import distributed as sd
from simwarp.heads import NeighborClassificationHead, NeighborRegressionHead
from simwarp.steps import SoftStep

D, E = 5, 3
N_BATCH = {2: [7, 4], 4: [3, 5, 2, 4]}  # uneven per-rank batches
M_SHARD = {2: [9, 14], 4: [6, 0, 11, 7]}  # uneven bank shards, one empty
N_QUERY_LOCAL = {2: [4, 2], 4: [2, 3, 1, 2]}
HEAD_SHARD = {2: [9, 14], 4: [6, 0, 11, 7]}  # uneven head bank shards, one empty
HEAD_BATCH = {2: [1, 6], 4: [3, 1, 0, 4]}  # heads' training batches: ranks with 1 and 0 rows
N_QUERY = 6
TOP = 4
FEW_Z = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.1, 0, 0]], dtype=torch.float64)
FEW_Y = torch.tensor([0, 0, 1])
ATOL = 1e-10


def _offsets(sizes):
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def _data(world):
    g = torch.Generator().manual_seed(1234)
    n, m = sum(N_BATCH[world]), sum(M_SHARD[world])
    return {
        "z": torch.randn(n, D, generator=g, dtype=torch.float64),
        "y": torch.randn(n, E, generator=g, dtype=torch.float64) * 2.0 + 1.0,
        "g": torch.randn(n, E, generator=g, dtype=torch.float64),  # upstream gradient
        "cls": torch.randint(0, 3, (n,), generator=g),
        "bank_z": torch.randn(m, D, generator=g, dtype=torch.float64),
        "bank_y": torch.randn(m, E, generator=g, dtype=torch.float64),
        "bank_cls": torch.randint(0, 3, (m,), generator=g),
        "q": torch.randn(N_QUERY, D, generator=g, dtype=torch.float64),
        "ql": torch.randn(sum(N_QUERY_LOCAL[world]), D, generator=g, dtype=torch.float64),
    }


def _softstep():
    torch.manual_seed(7)
    ss = SoftStep(mode="instance", in_features=D, init=(0.2, 0.8, 0.4)).double()
    with torch.no_grad():
        for p in ss.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return ss


def _head(kind, gather):
    torch.manual_seed(5)
    if kind == "reg":
        head = NeighborRegressionHead(D, E, metric="l2", mode="instance", gather=gather, learn_scale=True)
    else:
        head = NeighborClassificationHead(D, 3, metric="cosine", mode="instance", gather=gather)
    head = head.double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def _one_rank_errors(data, world, rank, rb, ks) -> dict:
    """Inputs that are wrong on one rank only (rank 1; the last for the bank, whose shard on
    rank 1 may be empty): every rank must raise (that rank its own error, the
    others one naming rank 1), none may wait in a collective; and a reducer that drops every
    loss of a rank must not make that rank skip the gather's backward."""
    from pytorch_metric_learning.reducers import ThresholdReducer

    bad = rank == 1
    z, y, cls = data["z"][rb].clone(), data["y"][rb].clone(), data["cls"][rb]
    cases = {}

    def attempt(name, fn):
        try:
            fn()
            cases[name] = None
        except dist.DistBackendError:
            raise  # a timeout: the ranks are out of step, so nothing after it would mean anything
        except (ValueError, TypeError, RuntimeError, KeyError) as err:
            cases[name] = f"{type(err).__name__}: {err}"

    nan_z = z.clone()
    if bad and len(nan_z):
        nan_z[0, 0] = float("nan")
    attempt("instance_nan_training", lambda: _head("reg", gather=True)(nan_z, y).sum().backward())
    nan_y = y.clone()
    if bad and len(nan_y):
        nan_y[0, 0] = float("inf")
    attempt("nan_labels", lambda: _head("reg", gather=True)(z, nan_y))
    head = _head("reg", gather=True).eval()
    head.set_bank(data["bank_z"][ks], data["bank_y"][ks])
    attempt("query_width", lambda: head(data["q"][:, : D - 1] if bad else data["q"]))
    bank_z = data["bank_z"][ks].clone()
    if rank == world - 1:
        bank_z[0, 0] = float("nan")
    attempt("nan_bank", lambda: _head("reg", gather=True).set_bank(bank_z, data["bank_y"][ks]))
    # fit_bank's encoding fails on one rank (dict batches without their labels' key there)
    batches = [{"x": data["bank_z"][ks], ("y" if bad else "labels"): data["bank_y"][ks]}]
    attempt("fit_bank_encoding", lambda: _head("reg", gather=True).eval().fit_bank(lambda x: x, batches, progress=False))
    # the functional gather: its own shape check, and the backend's option checks (which ran after the gathers)
    zq = z.clone().requires_grad_()
    attempt("gathered_rows", lambda: sd.gathered_warp_attend(zq, y[: len(y) - 1] if bad else y).sum().backward())
    attempt("gathered_params", lambda: sd.gathered_warp_attend(zq, y, a=0.95 if bad else 0.1, b=0.9).sum().backward())
    # class labels in another integer dtype on one rank: not an error (they are gathered as int64)
    attempt("mixed_label_dtypes", lambda: simwarp.SoftStepNCALoss(gather=True)(z, cls.int() if bad else cls))
    attempt("mixed_target_dtypes", lambda: simwarp.SoftStepNeighborRegressionLoss(gather=True)(z, y.float() if bad else y))
    attempt("mixed_label_dtypes_contrastive", lambda: simwarp.SoftStepContrastiveLoss(gather=True)(z, cls.to(torch.uint8) if bad else cls))
    half_labels = cls.double() + (0.5 if bad else 0.0)
    attempt("float_class_labels", lambda: simwarp.SoftStepNCALoss(gather=True)(z, half_labels))
    attempt("instance_nan_loss", lambda: simwarp.SoftStepNCALoss(gather=True, mode="instance", embedding_size=D).double()(nan_z, cls))
    # rank 0 trains while the others predict: different collectives, so every rank must refuse
    mixed = _head("reg", gather=True)
    mixed.set_bank(data["bank_z"][ks], data["bank_y"][ks])
    mixed.train(rank == 0)
    attempt("mixed_modes", lambda: mixed(z, y) if rank == 0 else mixed(data["q"]))
    # a ThresholdReducer that filters every loss of rank 0: its backward must still join the gather's
    loss = simwarp.SoftStepNeighborRegressionLoss(gather=True, reducer=ThresholdReducer(low=1e9 if rank == 0 else 0.0))
    zz = z.clone().requires_grad_()
    attempt("reducer_drops_a_rank", lambda: loss(zz, y).backward())
    # the same inside DistributedDataParallel: rank 0's step parameters got no gradient, and the
    # other ranks waited in DDP's all-reduce of them
    from torch.nn.parallel import DistributedDataParallel

    class Model(torch.nn.Module):
        def __init__(self, gather):
            super().__init__()
            self.encoder = torch.nn.Linear(D, D).double()
            dropping = ThresholdReducer(low=1e9 if rank == 0 else 0.0)
            self.loss = simwarp.SoftStepContrastiveLoss(gather=gather, reducer=dropping).double()

        def forward(self, x, labels):
            return self.loss(self.encoder(x), labels)

    def ddp_steps(gather):  # (DDP finds an unused parameter in the step after)
        model = DistributedDataParallel(Model(gather))
        for _ in range(2):
            model(z, cls).backward()
        return [p.grad for p in model.module.loss.parameters()]

    # (with the per-rank loss too: its step's parameters were left without a gradient on rank 0)
    attempt("reducer_drops_a_rank_ddp", lambda: cases.__setitem__("ddp_step_grads", ddp_steps(True)))
    attempt("reducer_drops_a_rank_ddp_local", lambda: cases.__setitem__("ddp_step_grads_local", ddp_steps(False)))
    # ranks in different calls (a head on one, a loss or set_bank on another) or with heads
    # configured differently: the agreement's exchange had another length per call, which
    # gloo aborts the process for (SIGABRT) instead of raising
    other = _head("reg", gather=True).eval()
    other.set_bank(data["bank_z"][ks], data["bank_y"][ks])
    attempt("head_vs_loss", lambda: simwarp.SoftStepNCALoss(gather=True)(z, cls) if bad else other(data["q"]))
    attempt("set_bank_vs_predict", lambda: other.set_bank(data["bank_z"][ks], data["bank_y"][ks]) if bad else other(data["q"]))
    torch.manual_seed(5)
    widths = NeighborRegressionHead(D, 1 if bad else E, gather=True).double()
    attempt("out_features", lambda: widths(z, y[:, :1] if bad else y))
    attempt("explain_k", lambda: other.explain(data["q"], k=2 if bad else 3))
    # an unreduced loss dict (DoNothingReducer) keeps its link to the gather (it raised a TypeError)
    from pytorch_metric_learning.reducers import DoNothingReducer, PerAnchorReducer

    unreduced = simwarp.SoftStepNCALoss(gather=True, reducer=DoNothingReducer())
    attempt("do_nothing_reducer", lambda: unreduced(z.clone().requires_grad_(), cls)["loss"]["losses"].sum().backward())
    attempt("per_anchor_contrastive", lambda: simwarp.SoftStepContrastiveLoss(gather=True, reducer=PerAnchorReducer())(z, cls))
    return cases


def _run_heads(data, world, rank, gather=True) -> dict:
    """Train-mode step and sharded-bank eval of both heads (local parts when gathering)."""
    import simwarp.heads as heads_module

    rb = _rows(HEAD_BATCH[world], rank) if gather else slice(None, sum(HEAD_BATCH[world]))

    size_calls = []  # the heads' own global_size collectives (the union of a bank: once per bank)
    counted = heads_module.global_size
    heads_module.global_size = lambda *args: size_calls.append(args) or counted(*args)
    try:
        return _run_heads_counted(data, world, rank, gather, rb, size_calls)
    finally:
        heads_module.global_size = counted


def _run_heads_counted(data, world, rank, gather, rb, size_calls) -> dict:
    res = {}
    rh = _rows(HEAD_SHARD[world], rank) if gather else slice(None)
    rq = _rows(N_QUERY_LOCAL[world], rank) if gather else slice(None)
    for kind in ("reg", "cls"):
        head = _head(kind, gather)
        z = data["z"][rb].clone().requires_grad_(True)
        y = data["y"][rb] if kind == "reg" else data["cls"][rb]
        size_calls.clear()
        out = head(z, y)
        (out * data["g"][rb]).sum().backward()
        r = {"train": out.detach(), "z_grad": z.grad, "p_grad": [p.grad.clone() for p in head.parameters()],
             "keys": head.sparsity.get("neighbours"),  # None on a rank without rows
             "train_size_calls": len(size_calls)}
        head.eval()
        bank_y = data["bank_y"] if kind == "reg" else data["bank_cls"]
        head.set_bank(data["bank_z"][rh], bank_y[rh])
        ql = data["ql"][rq]
        r["eval"] = head(ql)
        r["bank_keys"] = head.sparsity["neighbours"]
        r["explain"] = head.explain(ql, TOP)
        if kind == "reg":
            r["uncertainty"] = head.predict_with_uncertainty(ql)
            r["target_mean"] = head.target_mean.clone()
        r["eval_size_calls"] = len(size_calls)
        res[kind] = r
    return res


def _run_losses(data, world, rank, gather=True) -> dict:
    """Each loss with a sum reducer: per-rank loss and the local embeddings' gradient."""
    from pytorch_metric_learning.reducers import SumReducer

    rb = _rows(N_BATCH[world], rank) if gather else slice(None)
    res = {}
    for name, cls, labels in (
        ("nca", simwarp.SoftStepNCALoss, data["cls"]),
        ("contrastive", simwarp.SoftStepContrastiveLoss, data["cls"]),
        ("regression", simwarp.SoftStepNeighborRegressionLoss, data["y"]),
    ):
        torch.manual_seed(3)
        loss_fn = cls(mode="instance", embedding_size=D, reducer=SumReducer(), gather=gather).double()
        z = data["z"][rb].clone().requires_grad_(True)
        loss = loss_fn(z, labels[rb])
        loss.backward()
        res[name] = {"loss": loss.detach(), "z_grad": z.grad, "p_grad": [p.grad.clone() for p in loss_fn.parameters()]}
    # NCA over class blocks (few class columns per backend call, streamed): each block of
    # anchors meets its own rows of the global batch through the backend's self_offset
    import simwarp.losses as sl

    saved_columns, sl.MAX_CLASS_COLUMNS = sl.MAX_CLASS_COLUMNS, 2
    try:
        torch.manual_seed(3)
        loss_fn = simwarp.SoftStepNCALoss(
            mode="instance", embedding_size=D, reducer=SumReducer(), gather=gather, impl="chunked", chunk_size=5
        ).double()
        z = data["z"][rb].clone().requires_grad_(True)
        loss = loss_fn(z, data["cls"][rb])
        loss.backward()
        res["nca_blocked"] = {"loss": loss.detach(), "z_grad": z.grad, "p_grad": [p.grad.clone() for p in loss_fn.parameters()]}
    finally:
        sl.MAX_CLASS_COLUMNS = saved_columns
    if gather:
        # rank 0's anchors have no positive anywhere: its loss is zero, but it must still join
        # the gather's backward collective, or the other ranks would hang here
        labels = data["cls"][rb].clone()
        if rank == 0:
            labels = 10_000 + torch.arange(labels.shape[0])
        z = data["z"][rb].clone().requires_grad_(True)
        loss = simwarp.SoftStepNCALoss(reducer=SumReducer(), gather=True).double()(z, labels)
        loss.backward()
        res["nca_rank0_without_positives"] = {"loss": loss.detach(), "z_grad": z.grad}
    return res


def _rows(sizes, rank):
    off = _offsets(sizes)[rank]
    return slice(off, off + sizes[rank])


# ---------------------------------------------------------------------------------------
# What every rank runs
# ---------------------------------------------------------------------------------------


def _run_rank(rank: int, world: int) -> dict:
    data = _data(world)
    res: dict = {}
    rb = _rows(N_BATCH[world], rank)

    # 1. in-batch neighbours across ranks, leave-one-out, per-row (instance) SoftStep, grads
    for impl, chunk in (("dense", None), ("chunked", 3)):
        ss = _softstep()
        z = data["z"][rb].clone().requires_grad_(True)
        y = data["y"][rb].clone().requires_grad_(True)
        out, stats = sd.gathered_warp_attend(
            z, y, metric="l2", impl=impl, chunk_size=chunk, return_stats=True, **ss.kwargs(z)
        )
        (out * data["g"][rb]).sum().backward()
        res[f"batch_{impl}"] = {
            "out": out.detach(), "lse": stats.lse.detach(), "kept": stats.kept, "z_grad": z.grad, "y_grad": y.grad,
            "ss_grad": [p.grad.clone() for p in ss.parameters()],
        }

    # 2. sharded bank, replicated queries, per-query parameters
    ks = _rows(M_SHARD[world], rank)
    ss = _softstep()
    kw = ss.kwargs(data["q"])
    out, stats = sd.sharded_warp_attend(
        data["q"], data["bank_z"][ks], data["bank_y"][ks], metric="l2", chunk_size=4, return_stats=True, **kw
    )
    res["bank_replicated"] = {"out": out, "stats": stats}
    res["bank_dot"] = sd.sharded_warp_attend(
        data["q"], data["bank_z"][ks], data["bank_y"][ks], metric="dot", temperature=0.5, step="log", a=0.1, b=0.9
    )
    # float32 inputs: computed in float32 like the backend
    res["bank_f32"] = sd.sharded_warp_attend(
        data["q"].float(), data["bank_z"][ks].float(), data["bank_y"][ks].float(), metric="cosine"
    )

    # 3. sharded bank, local (per-rank) queries of uneven sizes
    rq = _rows(N_QUERY_LOCAL[world], rank)
    ql = data["ql"][rq]
    out, stats = sd.sharded_warp_attend(
        ql, data["bank_z"][ks], data["bank_y"][ks], queries="local", metric="l2", return_stats=True, **ss.kwargs(ql)
    )
    res["bank_local"] = {"out": out, "lse": stats.lse}

    # 4. explain: merged top-k over shards
    res["explain"] = sd.sharded_explain(data["q"], data["bank_z"][ks], TOP, metric="l2", chunk_size=5, **kw)
    res["explain_local"] = sd.sharded_explain(ql, data["bank_z"][ks], TOP, queries="local", metric="l2", **ss.kwargs(ql))
    res["explain_half"] = sd.sharded_explain(data["q"].half(), data["bank_z"][ks].half(), TOP, metric="l2")
    # float32 at |s|/τ ~ 1e7: the block-to-global rescaling of the weights must stay exact
    res["explain_large"] = sd.sharded_explain(
        data["q"].float() * 1e3, data["bank_z"][ks].float() * 1e3, TOP, metric="sqeuclidean", temperature=0.05, chunk_size=4
    )

    # 5. heads with gather=True
    res["heads"] = _run_heads(data, world, rank)

    # 6. losses with gather=True
    res["losses"] = _run_losses(data, world, rank)

    # 7. helpers
    try:  # a global batch of one row cannot be left one out: every rank raises, none hangs
        sd.gathered_warp_attend(data["z"][:1] if rank == 0 else data["z"][:0], data["y"][:1] if rank == 0 else data["y"][:0])
        res["tiny_batch_error"] = None
    except ValueError as err:
        res["tiny_batch_error"] = str(err)
    head = _head("reg", gather=True)
    try:  # the same through a head: its target statistics must not have seen the failing batch
        head(data["z"][:1] if rank == 0 else data["z"][:0], data["y"][:1] if rank == 0 else data["y"][:0])
        res["tiny_head_error"] = None
    except ValueError as err:
        res["tiny_head_error"] = (str(err), int(head.targets_seen))
    try:  # a layout mismatch across ranks: every rank raises, none corrupts or hangs
        sd.gather_rows(torch.zeros(2, 3, dtype=torch.float16 if rank == 0 else torch.bfloat16))
        res["layout_error"] = None
    except ValueError as err:
        res["layout_error"] = str(err)
    try:  # values of another width on one rank (their sizes come with the keys' gather)
        width = 2 if rank == 0 else 3
        sd.gathered_warp_attend(data["z"][rb], torch.zeros(len(data["z"][rb]), width, dtype=data["z"].dtype))
        res["value_layout_error"] = None
    except ValueError as err:
        res["value_layout_error"] = str(err)
    try:  # a bank whose d differs on rank 1 only: rank 1 raised alone, the others hung
        kd = data["bank_z"][ks] if rank != 1 else data["bank_z"][ks][:, :-1]
        sd.sharded_warp_attend(data["q"], kd, data["bank_y"][ks], metric="l2")
        res["bank_layout_error"] = None
    except ValueError as err:
        res["bank_layout_error"] = str(err)
    try:  # bank values of another width on one rank, each rank valid on its own: every rank hung
        vd = data["bank_y"][ks] if rank != 1 else torch.cat([data["bank_y"][ks]] * 2, dim=1)
        sd.sharded_warp_attend(data["q"], data["bank_z"][ks], vd, metric="l2")
        res["bank_width_error"] = None
    except ValueError as err:
        res["bank_width_error"] = str(err)
    # fit_bank with an empty loader on rank 1: an empty shard of the gathered bank, no hang
    head = _head("reg", gather=True).eval()
    shard = [] if rank == 1 else [(data["bank_z"][ks], data["bank_y"][ks])]
    head.fit_bank(None, shard, progress=False)
    res["empty_shard_bank"] = head.bank_size
    # a NaN query against a sharded bank: a NaN row, as in one process (it raised about row_range)
    head = NeighborRegressionHead(D, E, mode="global", gather=True).double().eval()  # global: no per-query a to refuse NaN
    head.set_bank(data["bank_z"][ks], data["bank_y"][ks])
    nan_q = data["q"].clone()
    nan_q[1, 0] = float("nan")
    with torch.no_grad():
        res["nan_query_bank"] = head(nan_q)
    _, stats = sd.sharded_warp_attend(nan_q, data["bank_z"][ks], data["bank_y"][ks], metric="l2", return_stats=True)
    res["nan_query_stats"] = stats
    try:  # every shard empty: the same ValueError on every rank (the statistics went NaN)
        _head("reg", gather=True).set_bank(data["bank_z"][:0], data["bank_y"][:0])
        res["empty_union_error"] = None
    except ValueError as err:
        res["empty_union_error"] = str(err)
    # PML's "at most one pair of each kind: zero loss" rule on the global batch, not per rank:
    # three rows [0, 0, 1] with rank 0 holding the first alone
    from pytorch_metric_learning.reducers import SumReducer

    few = (slice(0, 1), slice(1, 3))[min(rank, 1)] if rank < 2 else slice(0, 0)
    loss = simwarp.SoftStepContrastiveLoss(step="none", gather=True, reducer=SumReducer())
    res["contrastive_few_pairs"] = loss(FEW_Z[few], FEW_Y[few]).detach()
    res["one_rank_errors"] = _one_rank_errors(data, world, rank, rb, ks)
    cnt, mean, m2 = sd.global_moments(data["y"][rb])
    res["moments"] = (cnt, mean, m2)
    res["global_size"] = sd.global_size(N_BATCH[world][rank])
    return res


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging CI
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        res = _run_rank(rank, world)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while another still talks to it (gloo aborted now and then)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group_results(request):
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.start_processes(_worker, args=(world, init_file, tmp), nprocs=world, join=True, start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return world, results


# ---------------------------------------------------------------------------------------
# Single-process references and comparisons
# ---------------------------------------------------------------------------------------


def _close(a, b, atol=ATOL, rtol=1e-9):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_gathered_batch_values_and_gradients(group_results, impl):
    world, results = group_results
    data = _data(world)
    ss = _softstep()
    z = data["z"].clone().requires_grad_(True)
    y = data["y"].clone().requires_grad_(True)
    out, stats = simwarp.warp_attend(z, z, y, metric="l2", exclude_self=True, return_stats=True, impl="dense", **ss.kwargs(z))
    (out * data["g"]).sum().backward()
    ss_grad_sum = None
    for rank, res in enumerate(results):
        r = res[f"batch_{impl}"]
        rows = _rows(N_BATCH[world], rank)
        _close(r["out"], out.detach()[rows])
        _close(r["lse"], stats.lse.detach()[rows])
        _close(r["kept"], stats.kept[rows])
        _close(r["z_grad"], z.grad[rows])
        _close(r["y_grad"], y.grad[rows])
        ss_grad_sum = r["ss_grad"] if ss_grad_sum is None else [a + b for a, b in zip(ss_grad_sum, r["ss_grad"])]
    # summed over ranks (what DDP all-reduces) the parameter gradients are the single-process ones
    for got, p in zip(ss_grad_sum, ss.parameters()):
        _close(got, p.grad)


def test_sharded_bank_equals_single_process(group_results):
    world, results = group_results
    data = _data(world)
    kw = _softstep().kwargs(data["q"])
    with torch.no_grad():
        ref, st = simwarp.warp_attend(data["q"], data["bank_z"], data["bank_y"], metric="l2", return_stats=True, impl="dense", **kw)
        ref_dot = simwarp.warp_attend(data["q"], data["bank_z"], data["bank_y"], metric="dot", temperature=0.5, step="log", a=0.1, b=0.9)
        ref32 = simwarp.warp_attend(data["q"].float(), data["bank_z"].float(), data["bank_y"].float(), metric="cosine")
    for res in results:
        r = res["bank_replicated"]
        _close(r["out"], ref)
        for name in ("lse", "kept", "lo", "hi", "empty"):
            _close(getattr(r["stats"], name), getattr(st, name))
        _close(res["bank_dot"], ref_dot)
        assert res["bank_f32"].dtype == torch.float32
        _close(res["bank_f32"], ref32, atol=1e-5, rtol=1e-5)


def test_sharded_bank_local_queries(group_results):
    world, results = group_results
    data = _data(world)
    kw = _softstep().kwargs(data["ql"])
    with torch.no_grad():
        ref, st = simwarp.warp_attend(data["ql"], data["bank_z"], data["bank_y"], metric="l2", return_stats=True, **kw)
    for rank, res in enumerate(results):
        rows = _rows(N_QUERY_LOCAL[world], rank)
        _close(res["bank_local"]["out"], ref[rows])
        _close(res["bank_local"]["lse"], st.lse[rows])


def test_sharded_explain_merges_top_k(group_results):
    world, results = group_results
    data = _data(world)
    for key, q in (("explain", data["q"]), ("explain_local", data["ql"])):
        w = simwarp.warp_weights(q, data["bank_z"], metric="l2", **_softstep().kwargs(q))
        top = torch.topk(w, TOP, dim=-1)
        for rank, res in enumerate(results):
            idx, wt = res[key]
            rows = slice(None) if key == "explain" else _rows(N_QUERY_LOCAL[world], rank)
            assert idx.dtype == torch.long and idx.shape == (top.values[rows].shape)
            _close(wt, top.values[rows])
            _close(w[rows].gather(1, idx), wt)  # the indices point at those weights
    for res in results:  # in the compute dtype, as warp_weights and a head's explain give them
        assert res["explain_half"][1].dtype == torch.float32


def test_sharded_explain_is_exact_at_large_logits(group_results):
    world, results = group_results
    data = _data(world)
    w = simwarp.warp_weights(data["q"].float() * 1e3, data["bank_z"].float() * 1e3, metric="sqeuclidean", temperature=0.05)
    for res in results:
        idx, wt = res["explain_large"]
        torch.testing.assert_close(wt, w.topk(TOP, dim=-1).values, rtol=1e-5, atol=1e-30)
        assert (wt.sum(-1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("kind", ["reg", "cls"])
def test_heads_gather_equal_single_process(group_results, kind):
    world, results = group_results
    data = _data(world)
    ref = _run_heads(data, world, 0, gather=False)[kind]
    grad_sum = None
    for rank, res in enumerate(results):
        r = res["heads"][kind]
        rb, rq = _rows(HEAD_BATCH[world], rank), _rows(N_QUERY_LOCAL[world], rank)
        _close(r["train"], ref["train"][rb])
        _close(r["z_grad"], ref["z_grad"][rb])
        assert r["keys"] == (ref["keys"] if HEAD_BATCH[world][rank] else None) and r["bank_keys"] == ref["bank_keys"]
        assert r["train_size_calls"] == 0 and r["eval_size_calls"] == 0  # the bank's union: learnt with the agreed checks
        _close(r["eval"], ref["eval"][rq])
        _close(r["explain"][1], ref["explain"][1][rq])
        assert torch.equal(r["explain"][0], ref["explain"][0][rq])
        if kind == "reg":
            _close(r["uncertainty"][0], ref["uncertainty"][0][rq])
            _close(r["uncertainty"][1], ref["uncertainty"][1][rq])
            _close(r["target_mean"], ref["target_mean"])
        grad_sum = r["p_grad"] if grad_sum is None else [a + b for a, b in zip(grad_sum, r["p_grad"])]
    for got, want in zip(grad_sum, ref["p_grad"]):
        _close(got, want)


@pytest.mark.parametrize("name", ["nca", "contrastive", "regression", "nca_blocked"])
def test_losses_gather_equal_single_process(group_results, name):
    world, results = group_results
    ref = _run_losses(_data(world), world, 0, gather=False)[name]
    total, grad_sum = 0.0, None
    for rank, res in enumerate(results):
        r = res["losses"][name]
        total = total + r["loss"]
        _close(r["z_grad"], ref["z_grad"][_rows(N_BATCH[world], rank)])
        grad_sum = r["p_grad"] if grad_sum is None else [a + b for a, b in zip(grad_sum, r["p_grad"])]
    _close(total, ref["loss"])
    for got, want in zip(grad_sum, ref["p_grad"]):
        _close(got, want)


def test_loss_gather_rank_without_positives_does_not_hang(group_results):
    world, results = group_results
    for rank, res in enumerate(results):
        r = res["losses"]["nca_rank0_without_positives"]
        assert torch.isfinite(r["loss"]) and torch.isfinite(r["z_grad"]).all()
        if rank == 0:
            assert r["loss"] == 0


def test_helpers(group_results):
    world, results = group_results
    data = _data(world)
    y = data["y"]
    for res in results:
        cnt, mean, m2 = res["moments"]
        assert cnt == y.shape[0]
        _close(mean, y.mean(0))
        _close(m2, ((y - y.mean(0)) ** 2).sum(0))
        assert res["global_size"] == sum(N_BATCH[world])


# ---------------------------------------------------------------------------------------
# Without a process group
# ---------------------------------------------------------------------------------------


def test_resolve_group_and_errors_without_init():
    assert sd.resolve_group(False) == (False, None)
    assert sd.resolve_group(None) == (False, None)
    with pytest.raises(TypeError, match="gather"):
        sd.resolve_group("yes")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            sd.resolve_group(True)
        with pytest.raises(RuntimeError, match="init_process_group"):
            sd.sharded_warp_attend(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 1))


def test_leave_one_out_mask():
    m = sd.leave_one_out_mask(3, 2, 6)
    expected = torch.ones(3, 6, dtype=torch.bool)
    expected[0, 2] = expected[1, 3] = expected[2, 4] = False
    assert torch.equal(m, expected)
    assert sd.leave_one_out_mask(2, 1, 3).tolist() == [[True, False, True], [True, True, False]]  # the last rank
    with pytest.raises(ValueError, match="do not fit"):
        sd.leave_one_out_mask(3, 4, 6)


def test_layout_mismatch_raises_on_every_rank(group_results):
    world, results = group_results
    for res in results:
        message = res["layout_error"]
        assert message is not None and "rank 0: torch.float16" in message and "rank 1: torch.bfloat16" in message


def test_value_layout_mismatch_raises_on_every_rank_and_empty_shards_fit(group_results):
    """Values gathered with the keys' sizes skipped the layout check: one rank aborted inside
    gloo, the other returned partly uninitialised rows. An empty fit_bank loader on one rank
    raised there alone while the others waited in set_bank's collectives."""
    world, results = group_results
    for rank, res in enumerate(results):
        message = res["value_layout_error"]
        assert message is not None and "same dtype and row shape on every rank" in message
        assert "invalid sharded-bank inputs on rank(s) [1]" in (res["bank_layout_error"] or "")
        assert "must agree across ranks in v width" in (res["bank_width_error"] or "")
        rows = _rows(M_SHARD[world], rank)
        assert res["empty_shard_bank"] == (0 if rank == 1 else rows.stop - rows.start)


def test_sharded_bank_edge_cases(group_results):
    """A NaN query gives a NaN row (every rank raised about row_range, which the user never
    passed); a bank with every shard empty raises on every rank (the target statistics became
    NaN); the contrastive loss applies PML's few-pairs rule to the global batch."""
    world, results = group_results
    data = _data(world)
    head = NeighborRegressionHead(D, E, mode="global").double().eval()
    head.set_bank(data["bank_z"], data["bank_y"])
    nan_q = data["q"].clone()
    nan_q[1, 0] = float("nan")
    with torch.no_grad():
        want = head(nan_q)
    single = simwarp.SoftStepContrastiveLoss(step="none", reducer=_sum_reducer())(FEW_Z, FEW_Y)
    assert single > 0
    for res in results:
        got = res["nan_query_bank"]
        assert got[1].isnan().all() and not got[[0, 2]].isnan().any()
        _close(got[[0, 2, 3, 4, 5]], want[[0, 2, 3, 4, 5]])
        assert "no entry on any rank" in (res["empty_union_error"] or "")
        stats = res["nan_query_stats"]  # a NaN row, not an empty one (as warp_attend flags it)
        assert not stats.empty.any() and stats.lse[1].isnan() and not stats.lse[[0, 2]].isnan().any()
    _close(sum(res["contrastive_few_pairs"] for res in results), single.detach())


def _sum_reducer():
    from pytorch_metric_learning.reducers import SumReducer

    return SumReducer()


@pytest.mark.parametrize("case", ["instance_nan_training", "nan_labels", "query_width", "nan_bank",
                                  "float_class_labels", "instance_nan_loss", "fit_bank_encoding",
                                  "gathered_rows", "gathered_params"])
def test_an_input_wrong_on_one_rank_raises_on_every_rank(group_results, case):
    """Before, only the rank with the bad input raised, and the others waited in the call's
    next collective until the process group's timeout (30 minutes by default)."""
    world, results = group_results
    bad = world - 1 if case == "nan_bank" else 1
    for rank, res in enumerate(results):
        message = res["one_rank_errors"][case]
        assert message is not None, (case, rank)
        if rank != bad:
            assert f"failed their checks on rank(s) [{bad}]" in message, (case, rank, message)
        else:
            assert "failed their checks" not in message, (case, message)


def test_class_labels_of_other_integer_dtypes_on_one_rank_are_fine(group_results):
    """They were gathered as they came: int32 on one rank next to int64 elsewhere raised
    "the gathered rows must have the same dtype" on every rank."""
    world, results = group_results
    for res in results:
        assert res["one_rank_errors"]["mixed_label_dtypes"] is None
        assert res["one_rank_errors"]["mixed_label_dtypes_contrastive"] is None
        assert res["one_rank_errors"]["mixed_target_dtypes"] is None  # (targets gathered in the embeddings' dtype)


def test_ranks_in_different_modes_all_refuse(group_results):
    world, results = group_results
    for res in results:
        assert "the ranks made different calls" in (res["one_rank_errors"]["mixed_modes"] or "")


@pytest.mark.parametrize("case", ["head_vs_loss", "set_bank_vs_predict", "out_features", "explain_k"])
def test_ranks_in_different_calls_or_settings_all_refuse(group_results, case):
    """A head on one rank and a loss (or set_bank) on another, or heads of different widths:
    the process on some rank was killed by gloo (SIGABRT: the agreement's all-gather had another
    length), or the rank went on into mismatched collectives; different explain k merged wrong
    top-k lists without a word."""
    world, results = group_results
    expected = "different calls" if case in ("head_vs_loss", "set_bank_vs_predict") else "different settings"
    for res in results:
        message = res["one_rank_errors"][case] or ""
        assert f"the ranks {'made' if expected == 'different calls' else 'called with'} {expected}" in message, (case, message)


def test_a_reducer_that_drops_every_loss_of_a_rank_does_not_hang(group_results):
    world, results = group_results
    for res in results:
        assert res["one_rank_errors"]["reducer_drops_a_rank"] is None
        for local in ("", "_local"):
            assert res["one_rank_errors"][f"reducer_drops_a_rank_ddp{local}"] is None
            assert all(g is not None for g in res["one_rank_errors"][f"ddp_step_grads{local}"])
        assert res["one_rank_errors"]["do_nothing_reducer"] is None  # PML's loss dict, linked per entry
        assert "PerAnchorReducer" in (res["one_rank_errors"]["per_anchor_contrastive"] or "")


def test_global_batch_of_one_row_raises_on_every_rank(group_results):
    world, results = group_results
    expected = str([1] + [0] * (world - 1))
    for res in results:
        message, seen = res["tiny_head_error"]
        assert "at least 2 rows across ranks" in message and expected in message and seen == 0
        message = res["tiny_batch_error"]
        assert message is not None and "at least 2 rows across ranks" in message and expected in message


def test_leave_one_out_mask_names_bad_sizes():
    from simwarp.distributed import leave_one_out_mask

    for kwargs in (dict(n=-1, offset=0, total=2), dict(n=2, offset=-1, total=2), dict(n=2, offset=0, total="4")):
        with pytest.raises(ValueError, match="must be a non-negative int"):
            leave_one_out_mask(**kwargs)
    with pytest.raises(ValueError, match="do not fit in a global batch of 2"):
        leave_one_out_mask(2, 1, 2)
    assert leave_one_out_mask(2, 1, 3).tolist() == [[True, False, True], [True, True, False]]
    assert leave_one_out_mask(torch.tensor(2), torch.tensor(1), 3).tolist() == leave_one_out_mask(2, 1, 3).tolist()
