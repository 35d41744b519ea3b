"""The front ends under torch.compile, torch.export and torch.func.

Compiled code must match eager without graph breaks where a host read-back is not inherent
(data checks become in-graph assertions), dynamic shapes must stay symbolic, and torch.func
transforms, which the streaming autograd functions do not support, must fail with an error
that says so. ``backend="aot_eager"`` traces exactly as inductor does without compiling C++.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

import simwarp
from simwarp import NeighborClassificationHead, NeighborRegressionHead
from simwarp.similarity import paired_similarity

pytestmark = pytest.mark.fullgraph


def compiled(fn, **kwargs):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True, **kwargs)


def test_dynamic_shapes_trace_the_parameter_checks_and_keep_the_batch_symbolic():
    """dynamic=True makes Python floats symbolic: the finiteness checks of temperature and
    scale, and the float32 rounding of the step parameters, must trace (math.isfinite and
    struct.pack did not), and new batch sizes must not recompile."""
    from torch._dynamo.utils import counters

    def attend(q, tau):
        return simwarp.warp_attend(q, q, q, temperature=tau, scale=0.5)

    counters.clear()
    f = compiled(attend, dynamic=True)
    for n in (6, 9, 12):
        q = torch.randn(2, n, 4)
        torch.testing.assert_close(f(q, 0.7), attend(q, 0.7))
    assert counters["stats"]["unique_graphs"] == 1

    head = NeighborRegressionHead(8, mode="global")
    f = compiled(head, dynamic=True)
    for n in (16, 24):
        z, y = torch.randn(n, 8), torch.randn(n)
        torch.testing.assert_close(f(z, y), head(z, y))


@pytest.mark.parametrize("impl, metric", [("dense", "l2"), ("chunked", "cosine")])
def test_dynamic_shapes_with_two_softstep_layers_in_one_graph(impl, metric):
    """dynamic=True makes Python floats symbolic: two SoftStep calls in one graph hit a dynamo
    assertion (a module-level float, or a float default argument, read in an
    autograd.Function's forward: log2(e), cosine's epsilon, l2's scale)."""

    def two_layers(x):
        y = simwarp.warp_attend(x, x, x, impl=impl, metric=metric)
        return simwarp.warp_attend(y, y, y, impl=impl, metric=metric)

    x = torch.randn(2, 5, 4, requires_grad=True)
    out = compiled(two_layers, dynamic=True)(x)
    torch.testing.assert_close(out, two_layers(x))
    out.sum().backward()


def test_dynamic_shapes_with_a_float_mask_and_grouped_heads():
    """Under dynamic=True a float mask's error text formatted the (symbolic) threshold, a graph
    break; per-head step parameters with grouped query heads raised a false shape error (`in`
    on symbolic sizes)."""
    q, mask = torch.randn(1, 2, 4, 8), torch.nn.Transformer.generate_square_subsequent_mask(4)
    masked = compiled(lambda q, m: simwarp.softstep_attention(q, q, q, attn_mask=m), dynamic=True)
    torch.testing.assert_close(masked(q, mask), simwarp.softstep_attention(q, q, q, attn_mask=mask))
    att = simwarp.SoftStepAttention(4, 4, mode="per_head")
    q, k = torch.randn(3, 4, 5, 4), torch.randn(3, 2, 5, 4)
    grouped = compiled(lambda q, k: att(q, k, k, enable_gqa=True), dynamic=True)
    torch.testing.assert_close(grouped(q, k), att(q, k, k, enable_gqa=True))


@pytest.mark.parametrize("step", ["sigmoidal", "none"])
def test_dense_attention_trains_in_one_graph(step):
    """step="none" took PyTorch's fused softmax after reading the empty-row flag back (a graph
    break); compiled code takes the general softmax."""

    def loss(q):
        return simwarp.softstep_attention(q, q, q, step=step, is_causal=True).square().sum()

    q = torch.randn(2, 2, 12, 8)
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    want, got = loss(q1), compiled(loss)(q2)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(q2.grad, q1.grad)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_chunked_attention_trains_in_one_graph(metric):
    """The chunked backward differentiated each key block's similarity with
    torch.autograd.grad, which dynamo cannot trace: a graph break (an error under
    fullgraph=True). It now uses the closed forms; self-attention's one tensor in three roles
    is passed once."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 13, 13, generator=gen) > 0.3

    def loss(x, y, a):
        attend = simwarp.warp_attend
        out = attend(x, x, x, metric=metric, causal=True, a=a, impl="chunked", chunk_size=4, return_stats=True)
        cross = attend(x, y, y, metric=metric, mask=mask, impl="chunked", chunk_size=5)
        return out[0].square().sum() + out[1].lse.sum() + cross.sum()

    x, y = torch.randn(2, 3, 13, 8, generator=gen), torch.randn(2, 1, 13, 8, generator=gen)
    a = torch.full((3, 1), 0.2)
    leaves = [(x.clone().requires_grad_(), y.clone().requires_grad_(), a.clone().requires_grad_()) for _ in range(2)]
    want, got = loss(*leaves[0]), compiled(loss)(*leaves[1])
    torch.testing.assert_close(got, want)
    for g1, g2 in zip(torch.autograd.grad(want, leaves[0]), torch.autograd.grad(got, leaves[1])):
        torch.testing.assert_close(g2, g1)


def test_chunked_attention_with_a_fixed_row_range_trains_in_one_graph():
    """A range fixed from outside (simwarp.distributed's sharded banks) took the autograd path
    in backward; the built-in steps now use their closed forms there too."""

    def loss(x, a):
        return simwarp.warp_attend(x, x, x, a=a, row_range=(-2.0, 3.0), impl="chunked", chunk_size=4).square().sum()

    x, a = torch.randn(2, 11, 8), torch.full((2, 11), 0.2)
    leaves = [(x.clone().requires_grad_(), a.clone().requires_grad_()) for _ in range(2)]
    want, got = loss(*leaves[0]), compiled(loss)(*leaves[1])
    torch.testing.assert_close(got, want)
    for g1, g2 in zip(torch.autograd.grad(want, leaves[0]), torch.autograd.grad(got, leaves[1])):
        torch.testing.assert_close(g2, g1)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_attention_dropout_trains_in_one_graph(impl, monkeypatch):
    """The chunked path replayed its dropout masks from a torch.Generator seeded with a value
    read back from the device: two graph breaks (an error under fullgraph=True). Compiled, its
    masks are a hash of each weight's position, seeded by a tensor in the graph; the eager
    reference is made to draw that hash too, so both use one mask."""
    from simwarp.backend import chunked

    def loss(x, a):
        out = simwarp.warp_attend(x, x, x, a=a, causal=True, impl=impl, chunk_size=4, dropout_p=0.3)
        return out.square().sum()

    x, a = torch.randn(2, 3, 13, 8), torch.full((3, 1), 0.2)
    leaves = [(x.clone().requires_grad_(), a.clone().requires_grad_()) for _ in range(2)]
    with monkeypatch.context() as patch:
        patch.setattr(chunked, "_draw_seed", chunked._draw_hash_seed)
        torch.manual_seed(0)
        want = loss(*leaves[0])
    torch.manual_seed(0)
    got = compiled(loss)(*leaves[1])
    torch.testing.assert_close(got, want)
    for g1, g2 in zip(torch.autograd.grad(want, leaves[0]), torch.autograd.grad(got, leaves[1])):
        torch.testing.assert_close(g2, g1)


def test_additive_masks_trace_and_still_refuse_score_biases():
    """nn.TransformerEncoder turns even a bool padding mask into an additive float one; the
    check that it holds only 0 and -inf is an in-graph assertion when compiled."""
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = simwarp.swap_attention(torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    x = torch.randn(2, 6, 16)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    torch.testing.assert_close(compiled(encoder)(x, src_key_padding_mask=padding), encoder(x, src_key_padding_mask=padding))

    def attend(q, mask):
        return simwarp.softstep_attention(q, q, q, attn_mask=mask)

    q = torch.randn(1, 2, 4, 8)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4)
    f = compiled(attend)
    torch.testing.assert_close(f(q, causal), attend(q, causal))
    alibi = causal + torch.arange(4.0)  # finite non-zero biases
    with pytest.raises(ValueError, match="finite score biases, NaN or"):
        attend(q, alibi)
    with pytest.raises(RuntimeError, match="finite score biases, NaN or"):
        f(q, alibi)


def test_classification_head_trains_in_one_graph_and_checks_labels_in_it():
    head = NeighborClassificationHead(8, num_classes=3, mode="global")
    z, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    f = compiled(head)
    torch.testing.assert_close(f(z, y), head(z, y))
    with pytest.raises(RuntimeError, match="labels must lie in"):
        f(z, torch.full((16,), 3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\), got range \[3, 3\]"):
        head(z, torch.full((16,), 3))


def test_regression_head_checks_labels_inside_the_graph():
    head = NeighborRegressionHead(8, mode="global")
    z, y = torch.randn(16, 8), torch.randn(16)
    y[3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf labels"):
        compiled(head)(z, y)


def test_export_keeps_the_batch_and_sequence_dynamic():
    """The dense path's row blocking specialised the number of rows (export refused a dynamic
    batch, and compile recompiled per sequence length)."""
    head = NeighborRegressionHead(8, mode="global").eval()
    head.set_bank(torch.randn(30, 8), torch.randn(30))
    program = export(head, (torch.randn(5, 8),), dynamic_shapes=({0: Dim("n", min=2, max=1000)},))
    z = torch.randn(17, 8)
    torch.testing.assert_close(program.module()(z), head(z))

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = simwarp.SoftStepAttention(2, 4)

        def forward(self, q):
            return self.attn(q, q, q, is_causal=True)

    model = Attention().eval()
    program = export(model, (torch.randn(1, 2, 6, 4),), dynamic_shapes=({2: Dim("L", min=2, max=64)},))
    q = torch.randn(1, 2, 11, 4)
    torch.testing.assert_close(program.module()(q), model(q))


def test_exported_programs_run_across_their_whole_dynamic_range():
    """``impl="auto"`` picked dense or chunked by size, and the kNN and many-class heads looped
    over blocks of rows: export turned each into a guard or a fixed batch, so an exported
    program failed above the example's size. Export now takes the size-free path."""
    bank_z, bank_y = torch.randn(2000, 4), torch.randn(2000)
    regression = NeighborRegressionHead(4).eval()
    regression.set_bank(bank_z, bank_y)
    knn = simwarp.KNNRegressionHead(4, k=3).eval()
    knn.set_bank(bank_z, bank_y)
    classes = simwarp.NeighborClassificationHead(4, 70).eval()
    classes.set_bank(bank_z, torch.randint(0, 70, (2000,)))
    for head in (regression, knn, classes):
        program = export(head, (torch.randn(5, 4),), dynamic_shapes=({0: Dim("batch", min=1, max=4096)},))
        for rows in (1, 600, 4096):
            z = torch.randn(rows, 4)
            torch.testing.assert_close(program.module()(z), head(z), msg=f"{type(head).__name__} at {rows} rows")

    # Above 2^18 / d rows the query norms were taken in slices: a guard capped the range there
    # (4096 rows at d = 64).
    wide = NeighborRegressionHead(64).eval()
    wide.set_bank(torch.randn(50, 64), torch.randn(50))
    program = export(wide, (torch.randn(5, 64),), dynamic_shapes=({0: Dim("batch", min=1, max=20_000)},))
    z = torch.randn(5000, 64)
    torch.testing.assert_close(program.module()(z), wide(z))

    attention = simwarp.SoftStepAttention(2, 4).eval()
    dims = {0: Dim("B", min=1, max=8), 2: Dim("L", min=2, max=2048)}
    program = export(attention, (torch.randn(2, 2, 6, 4),) * 3, dynamic_shapes=(dims,) * 3)
    for shape in ((1, 2, 5, 4), (3, 2, 900, 4)):
        q = torch.randn(shape)
        torch.testing.assert_close(program.module()(q, q, q), attention(q, q, q), atol=1e-5, rtol=1e-5)

    # Learned projections make q and k require grad in export's default grad mode: the range's
    # indexed extremum then capped the sequence length at 511 (a guard on its search's size).
    layer = simwarp.MultiheadSoftStepAttention(16, 4, batch_first=True).eval()

    def self_attention(x):
        return layer(x, x, x, need_weights=False)[0]

    module = torch.nn.Module()
    module.forward = self_attention
    program = export(module, (torch.randn(2, 5, 16),), dynamic_shapes=({1: Dim("L", min=2, max=4096)},))
    x = torch.randn(2, 1000, 16)
    torch.testing.assert_close(program.module()(x), self_attention(x), atol=1e-5, rtol=1e-5)


def test_torch_func_transforms_are_refused_with_a_clear_error():
    from torch.func import grad, vmap

    q = torch.randn(2, 6, 4)
    with pytest.raises(NotImplementedError, match="does not support torch.func"):
        grad(lambda q: simwarp.warp_attend(q, q, q).sum())(q)
    with pytest.raises(NotImplementedError, match="does not support torch.func"):
        vmap(lambda q: simwarp.softstep_attention(q, q, q))(q.unsqueeze(1))
    with pytest.raises(NotImplementedError, match="does not support torch.func"):
        grad(lambda e: simwarp.SoftStepNCALoss()(e, torch.arange(6) % 2))(torch.randn(6, 4))
    with pytest.raises(NotImplementedError, match="simwarp.warp_range does not support torch.func"):
        vmap(lambda q: simwarp.warp_range(q, q)[0])(q)
    # the heads too (they failed inside PyTorch: the running statistics, the label checks)
    z, y = torch.randn(8, 4), torch.randn(8)
    with pytest.raises(NotImplementedError, match="NeighborRegressionHead.forward does not support torch.func"):
        grad(lambda z: NeighborRegressionHead(4, mode="global")(z, y).sum())(z)
    classifier = NeighborClassificationHead(4, 3, mode="global").eval()
    classifier.set_bank(torch.randn(10, 4), torch.arange(10) % 3)
    with pytest.raises(NotImplementedError, match="NeighborClassificationHead.forward does not support torch.func"):
        vmap(classifier)(z.unsqueeze(1))
    # the similarity functions are plain tensor code: transforms work there
    k = torch.randn(6, 4)
    torch.testing.assert_close(grad(lambda q: paired_similarity(q, k, "cosine").sum())(q[0]),
                               torch.autograd.functional.vjp(lambda q: paired_similarity(q, k, "cosine"),
                                                             q[0], torch.ones(6))[1])
    # functional_call with ordinary autograd is fine
    head = NeighborRegressionHead(4, mode="global")
    params = dict(head.named_parameters())
    out = torch.func.functional_call(head, params, (torch.randn(8, 4), torch.randn(8)))
    out.sum().backward()
    assert all(p.grad is not None for p in params.values())


def test_paired_similarity_traces_with_data_dependent_row_counts():
    # the broadcast check guarded on unbacked sizes ("Could not guard on data-dependent expression")
    from simwarp.similarity import paired_similarity

    def pairs(x, m1, m2):
        a, p = m1.nonzero().squeeze(-1), m2.nonzero().squeeze(-1)
        return paired_similarity(x[a], x[p], "dot", 1.0).sum()

    x = torch.randn(6, 4)
    m1 = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    m2 = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool)
    torch._dynamo.reset()
    compiled = torch.compile(pairs, fullgraph=True, backend="eager")
    # (config.patch, not monkeypatch: on torch before 2.12 monkeypatch's undo deleted the setting)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.testing.assert_close(compiled(x, m1, m2), pairs(x, m1, m2))


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_the_torch_2_11_workaround_keeps_compiled_gradients(monkeypatch, impl):
    """torch 2.11's compiler routed the gradient of an autograd.Function output that forward had
    written in place to another output (pytorch/pytorch#180642): dense attention, the l2
    distance, the heads and the NCA loss trained on wrong gradients there. Under that torch the
    functions return copies of their outputs while compiling; this runs that path on any torch."""
    import simwarp._autograd as autograd_helpers

    monkeypatch.setattr(autograd_helpers, "_INPLACE_OUTPUT_BUG", True)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 13, 8, generator=gen), torch.randn(2, 13, 8, generator=gen)

    def loss(x, y):
        out, stats = simwarp.warp_attend(x, y, y, metric="l2", impl=impl, chunk_size=4, return_stats=True)
        loo = simwarp.warp_attend(x, x, x, metric="sqeuclidean", step="poly", exclude_self=True, impl=impl, chunk_size=5)
        return out.square().sum() + stats.lse.sum() + loo.square().sum()

    leaves = [(x.clone().requires_grad_(), y.clone().requires_grad_()) for _ in range(2)]
    want, got = loss(*leaves[0]), compiled(loss)(*leaves[1])
    torch.testing.assert_close(got, want)
    for g1, g2 in zip(torch.autograd.grad(want, leaves[0]), torch.autograd.grad(got, leaves[1])):
        torch.testing.assert_close(g2, g1)

    def clones_traced(bug: bool) -> int:  # copies in the graphs dynamo hands over (where the bug lives)
        monkeypatch.setattr(autograd_helpers, "_INPLACE_OUTPUT_BUG", bug)
        count = []

        def backend(gm, example_inputs):
            for module in gm.modules():  # (a Function's forward is a subgraph of its own)
                if isinstance(module, torch.fx.GraphModule):
                    count.extend(node for node in module.graph.nodes if node.target in (torch.clone, "clone"))
            return gm.forward

        torch._dynamo.reset()
        torch.compile(loss, backend=backend)(*(t.clone().requires_grad_() for t in (x, y)))
        return len(count)

    # every Function the loss calls returns copies: at least one per autograd node on this path
    assert clones_traced(True) >= clones_traced(False) + 4


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_torch_func_transforms_are_refused_under_compile_too(impl):
    """A guard that skipped the refusal while compiling let torch.compile(grad(f)) reach the
    streaming backward, which returned wrong gradients without an error."""
    from torch.func import grad

    q = torch.randn(5, 4, dtype=torch.float64)
    torch._dynamo.reset()
    transformed = torch.compile(grad(lambda q: simwarp.warp_attend(q, q, q, impl=impl, chunk_size=2).square().sum()),
                                backend="eager")
    with pytest.raises(Exception, match="does not support torch.func transforms"):
        transformed(q)
