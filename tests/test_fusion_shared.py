"""The shared expert folded into the Int4 routed experts (``scout_mm.fusion.fuse_shared_expert``).

CPU: the PyTorch references (fold / unfold / refusals) and, in one ``TRITON_INTERPRET=1`` subprocess
(``test_interpreter_suite``), the Int4 MoE + fused router kernels in fp32 and fp16: a MoE layer and a small
model with the fold on vs off. GPU (marked ``gpu``): the same comparisons in bf16, decode and prefill sizes.
Folded and unfolded results differ by rounding only: the fold sums shared + routed slots in fp32 and rounds
once, the unfolded layer rounds the shared output, the routed sum, and their sum.
"""

from __future__ import annotations

import copy

import pytest
import torch

from scout_mm.fusion import (
    SharedSlotExperts,
    fuse_projections,
    fuse_shared_expert,
    is_fused,
    unfuse_projections,
    unfuse_shared_expert,
)
from scout_mm.model import ScoutForConditionalGeneration
from scout_mm.moe.layer import MoE
from scout_mm.quant import Int4Linear, QuantConfig, quantize_model, quantize_rtn
from tests.helpers import INTERPRETED, interpreter_suite, require_interpreter, tiny_config

test_interpreter_suite = interpreter_suite(__file__, OMP_NUM_THREADS="1")


@pytest.fixture
def triton_cpu(monkeypatch):
    """The Triton kernels (Int4 MoE, fused router) on CPU tensors, interpreted."""
    require_interpreter()
    pytest.importorskip("triton")
    monkeypatch.setenv("SCOUT_MM_KERNELS", "triton")
    monkeypatch.setenv("SCOUT_MM_FUSED", "on")


def int4_model(seed, group_size=32, symmetric=True, **text):
    overrides = dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=1,
                     use_shared_expert=True, num_hidden_layers=2)  # fmt: skip
    overrides.update(text)
    torch.manual_seed(seed)
    model = ScoutForConditionalGeneration(tiny_config(vision=False, **overrides)).eval()
    return quantize_model(model, QuantConfig(group_size=group_size, symmetric=symmetric))


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def max_rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------------------------ fold / unfold (reference)
@pytest.mark.parametrize("fuse_first", [True, False], ids=["gate_up-fused", "gate-up-separate"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_fold_unfold_restores_the_exact_packs_and_state_dict_refuses(fuse_first, symmetric):
    model = int4_model(1, symmetric=symmetric)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    if fuse_first:
        fuse_projections(model)
    fuse_shared_expert(model)
    fuse_shared_expert(model)  # idempotent
    layers = moe_layers(model)
    assert layers and all(m.shared_slot and m.shared_expert is None for m in layers)
    for m in layers:
        assert isinstance(m.experts, SharedSlotExperts) and m.experts.experts.n_experts == 5
        assert m.experts.shared_form == ("fused" if fuse_first else "separate")
    assert is_fused(model)
    with pytest.raises(RuntimeError, match="unfuse_projections"):
        model.state_dict()
    with pytest.raises(RuntimeError, match="unfuse"):
        model.load_state_dict(original)
    if not fuse_first:  # unfolding alone gives the separate projections back
        unfuse_shared_expert(model)
    else:  # unfuse_projections undoes both
        unfuse_projections(model)
    assert not is_fused(model)
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key


def test_layers_whose_shared_expert_does_not_fit_stay_unfolded():
    model = int4_model(2)
    first, second = moe_layers(model)
    # asymmetric (zeros) in the first layer's shared down projection, symmetric stacks: not stackable
    down = first.shared_expert.down_proj
    cfg = QuantConfig(group_size=32, symmetric=False)
    first.shared_expert.down_proj = Int4Linear.from_packed(
        quantize_rtn(torch.randn(down.in_features, down.out_features), 32, symmetric=False), cfg
    )
    fuse_shared_expert(model)
    assert not first.shared_slot and first.shared_expert is not None
    assert second.shared_slot
    # float (unquantized) experts are left alone
    torch.manual_seed(0)
    float_model = ScoutForConditionalGeneration(tiny_config(vision=False, hidden_size=64, intermediate_size=32,
                                                            num_local_experts=4, use_shared_expert=True))  # fmt: skip
    fuse_shared_expert(float_model)
    assert not any(m.shared_slot for m in moe_layers(float_model))


def test_reference_logits_and_router_outputs_match_unfolded():
    model = int4_model(3, num_experts_per_tok=2)
    folded = fuse_shared_expert(copy.deepcopy(model))
    ids = torch.randint(3, 290, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = folded(input_ids=ids).logits
        x = torch.randn(2, 7, 64)
        residual = torch.randn(2, 7, 64)
        for plain, fold in zip(moe_layers(model), moe_layers(folded)):
            ref_out, ref_ids, ref_logits = plain(x, residual=residual)
            got, got_ids, got_logits = fold(x, residual=residual)
            assert got_ids.shape == ref_ids.shape and torch.equal(got_ids, ref_ids)  # the E real experts
            assert torch.equal(got_logits, ref_logits)
            torch.testing.assert_close(got, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_loader_folds_by_default_and_unfuse_saves_the_checkpoint(tmp_path):
    from scout_mm.quant import load_quantized, save_quantized

    save_quantized(int4_model(4), tmp_path / "q")
    folded = load_quantized(tmp_path / "q", dtype=torch.float32, device="cpu")
    plain = load_quantized(tmp_path / "q", dtype=torch.float32, device="cpu", fuse=False, fuse_shared=False)
    assert all(m.shared_slot for m in moe_layers(folded)) and not any(
        m.shared_slot for m in moe_layers(plain)
    )
    ids = torch.randint(3, 290, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            folded(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )
    with pytest.raises(RuntimeError, match="unfuse_projections"):
        save_quantized(folded, tmp_path / "again")
    save_quantized(unfuse_projections(folded), tmp_path / "again")
    again = load_quantized(
        tmp_path / "again", dtype=torch.float32, device="cpu", fuse=False, fuse_shared=False
    )
    for (k, a), (k2, b) in zip(again.state_dict().items(), plain.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


# ------------------------------------------------------------------------------ kernels (interpreter, CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "tokens, top_k", [(1, 1), (5, 2), (70, 1)]
)  # 70 > ROUTER_MAX_TOKENS: no fused router
def test_moe_layer_folded_vs_unfolded_kernels(triton_cpu, tokens, top_k, dtype):
    model = int4_model(5, symmetric=tokens != 5, num_experts_per_tok=top_k).to(dtype)
    plain = moe_layers(model)[0]
    fold = moe_layers(fuse_shared_expert(copy.deepcopy(model)))[0]
    assert fold.shared_slot
    x = torch.randn(tokens, 64).to(dtype)
    residual = torch.randn(tokens, 64).to(dtype)
    with torch.no_grad():
        ref, ref_ids, ref_logits = plain(x, residual=residual)
        got, got_ids, got_logits = fold(x, residual=residual)
        got_plain = fold(x)[0]
    assert got.dtype == dtype and got_ids.shape == (tokens, top_k)
    assert torch.equal(got_logits, ref_logits) and torch.equal(got_ids, ref_ids)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert max_rel(got, ref) < tol
    assert max_rel(got_plain + residual, ref) < tol * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_model_logits_and_cached_greedy_generation_fold_on_vs_off(triton_cpu, dtype):
    from scout_mm.generation import generate_ids

    model = int4_model(6, num_experts_per_tok=2).to(dtype)
    folded = fuse_shared_expert(fuse_projections(copy.deepcopy(model)))
    ids = torch.randint(3, 290, (1, 10))
    with torch.no_grad():
        ref, out = model(input_ids=ids).logits, folded(input_ids=ids).logits
    assert max_rel(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:  # fp16 greedy choices may flip on a near tie; fp32 ones do not here
        a = generate_ids(model, ids, max_new_tokens=4, eos_token_id=[]).sequences
        b = generate_ids(folded, ids, max_new_tokens=4, eos_token_id=[]).sequences
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------- GPU
def random_int4_moe(hidden, inter, n_experts, top_k, device="cuda"):
    """A bf16 MoE layer with random Int4 routed + shared experts (group 128, symmetric)."""
    from scout_mm.quant.quantize import replace_with_empty_int4

    with torch.device("meta"):
        layer = torch.nn.ModuleDict({"moe": MoE(hidden, inter, n_experts, top_k)}).to(torch.bfloat16)
    replace_with_empty_int4(layer, QuantConfig())
    layer = layer.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if t is None:
                continue
            if name.endswith("qweight"):
                t.random_(-(2**31), 2**31 - 1)
            elif name.endswith("scales"):
                t.fill_(0.02 / 4.6)
            else:
                t.normal_(0.0, 0.02)
    return layer["moe"].eval()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (3, 2), (40, 1), (2300, 1)])  # 2300: dequant prefill path
def test_gpu_moe_layer_folded_vs_unfolded_bf16(tokens, top_k):
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs CUDA")
    torch.manual_seed(tokens)
    hidden, inter, n_experts = 1024, 512, 16
    plain = random_int4_moe(hidden, inter, n_experts, top_k)
    fold = copy.deepcopy(plain)
    holder = torch.nn.ModuleList([fold])
    fuse_projections(holder)
    fuse_shared_expert(holder)
    assert fold.shared_slot
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref_ids, ref_logits = plain(x, residual=residual)
        got, got_ids, got_logits = fold(x, residual=residual)
        # the unfolded layer's two parts, each rounded to bf16 once
        routed = plain.experts(x, *plain.router(x)[:2])
        shared = plain.shared_expert(x)
    assert torch.equal(got_ids, ref_ids) and torch.equal(got_logits, ref_logits)
    assert got_ids.shape == (tokens, top_k)
    # bf16: both round the block output before the residual add; the unfolded one also rounds shared and routed
    scale = float((routed.float() + shared.float()).abs().max())
    diff = (got.float() - ref.float()).abs()
    assert float(diff.max()) <= 2 * 2**-8 * (scale + float(residual.abs().max()))
    # without the residual: the fold's block output vs shared + routed summed in fp32
    with torch.no_grad():
        alone = fold(x)[0].float()
    assert float((alone - (routed.float() + shared.float())).abs().max()) <= 2 * 2**-8 * scale
