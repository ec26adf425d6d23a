"""`BitDanceModel.compile_blocks` (the trainer's `compile.enabled`): the compiled decoder layers
and head train exactly as eager ones, stop recompiling after the first change of row shape, and
leave parameter names alone. CPU tests trace with aot_eager (dynamo + AOTAutograd, no code
generation: seconds, not the minutes an Inductor build takes on 2 cores)."""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from test_attention import _grads, cuda, losses_of, packed_rows, tiny_bitdance


def train_rows(model, rows, row_len):
    """Loss and gradients of each row alone."""
    out = []
    for row in rows:
        model.zero_grad()
        loss = losses_of(model, [row], row_len)[0]["total"]
        loss.backward()
        out.append((loss.detach(), _grads(model)))
    return out


def test_compiled_blocks_train_like_eager_and_stop_recompiling():
    """With activation checkpointing, the harder case (recomputed graphs in the backward); the
    trainer's compiled run without it trains bitwise as eager (ar/test_train.py)."""
    torch._dynamo.reset()
    model, packer = tiny_bitdance()
    # what model.activation_checkpointing switches on
    model.llm.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False})
    model.head.activation_checkpointing = True
    model.train()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_blocks(counter)
    rows = packed_rows(packer) + packed_rows(packer, seed=1)  # six packings (sdpa: new shapes)

    counters.clear()
    compiled = train_rows(model, rows[:1], 256)
    frames = counter.frame_count
    compiled += train_rows(model, rows[1:], 256)
    assert counter.frame_count == frames, "recompiled for a new row shape"
    # One graph for every decoder layer (parameters are graph inputs), one for the head.
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    for (loss, grads), (ref_loss, ref_grads) in zip(compiled, train_rows(eager, rows, 256)):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
    assert list(model.state_dict()) == list(eager.state_dict())


def test_flex_inside_compiled_layers_is_part_of_their_graph():
    """flex called from a compiled layer goes into the layer's graph (the standalone compiled
    flex would break it in three around its config patch). Forward only: CPU flex has no
    backward. Three packings padded to one row length: one graph for the layers, one for the
    head; the losses are sdpa's."""
    torch._dynamo.reset()
    counters.clear()
    model, packer = tiny_bitdance()
    model.eval()
    rows = packed_rows(packer)
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        ref = [out["total"] for out in losses_of(model, rows, 256)]
        model.set_attn_backend("flex")
        model.compile_blocks(counter)
        got = [out["total"] for out in losses_of(model, rows, 256)]
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_compile_blocks_needs_a_layer_list():
    model, _ = tiny_bitdance()
    model.llm.model.layers = torch.nn.Sequential(*model.llm.model.layers)
    with pytest.raises(ValueError, match="no `layers` list"):
        model.compile_blocks("aot_eager")


@cuda
def test_cuda_compiled_flex_layers_compile_once_per_row_length():
    """The GPU path `compile.enabled` is for: flex inside compiled layers (Inductor, bf16).
    Three packings padded to one row length: one graph for the layers, one for the head;
    losses and gradients are eager sdpa's."""
    torch._dynamo.reset()
    model, packer = tiny_bitdance("cuda", torch.bfloat16)
    model.train()
    eager = copy.deepcopy(model)
    model.set_attn_backend("flex")
    model.compile_blocks("inductor")
    rows = packed_rows(packer)
    counters.clear()
    compiled = train_rows(model, rows, 256)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    for (loss, grads), (ref_loss, ref_grads) in zip(compiled, train_rows(eager, rows, 256)):
        torch.testing.assert_close(loss.float(), ref_loss.float(), atol=2e-2, rtol=2e-2)
        assert (grads - ref_grads).norm() <= 0.05 * ref_grads.norm()


def test_sampling_and_export_weights_run_eager():
    """What the trainer samples, evaluates and exports with runs eager: sampling's KV-cached
    shapes would only recompile the training graphs."""
    from bdt.training.ar.loop import _sampling_weights

    torch._dynamo.reset()
    model, packer = tiny_bitdance()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_blocks(counter)
    rows = packed_rows(packer)
    with torch.no_grad(), _sampling_weights(None, model, compiled=True) as module:
        eager_losses = losses_of(module, rows, 256)
    assert counter.frame_count == 0
    with torch.no_grad():
        compiled_losses = losses_of(model, rows, 256)
    assert counter.frame_count > 0
    torch.testing.assert_close([o["total"] for o in compiled_losses],
                               [o["total"] for o in eager_losses], rtol=1e-6, atol=0)
