"""Logit parity with HF ``Llama4ForConditionalGeneration`` / ``Llama4ForCausalLM`` (eager, fp32, random
weights) on small configs covering every semantic switch, plus the model's own contracts."""

from __future__ import annotations

import pytest
import torch

from scout_mm.model import ScoutForConditionalGeneration
from tests.helpers import hf_model, max_rel_err, ours_from_hf, replace, tiny_config

TOL = 1e-4

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# name -> text overrides. Sequences of 37-45 tokens cross chunk boundaries (8 or 16) several times.
TEXT_CONFIGS = {
    "top1_shared_chunk8_nope2": dict(),
    "top2_noshared_interleaved_noqknorm": dict(
        num_experts_per_tok=2,
        use_shared_expert=False,
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        no_rope_layer_interval=3,
        attention_chunk_size=16,
    ),
    "llama3_scaling_top2_shared": dict(
        rope_scaling=LLAMA3_SCALING, rope_theta=10000.0, num_experts_per_tok=2
    ),
    "mha_nope4_no_temperature": dict(
        num_key_value_heads=4, no_rope_layer_interval=4, attn_temperature_tuning=False, attention_chunk_size=5
    ),
    "gqa4_moe_layers_listed": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, moe_layers=[1, 2], num_local_experts=6
    ),
}


def _ids(cfg, batch, seq):
    # Avoid the image token so text-only inputs never trigger image merging.
    return torch.randint(3, cfg.image_token_index - 5, (batch, seq))


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_logits_match_hf_causal_lm(name):
    cfg = tiny_config(vision=False, **TEXT_CONFIGS[name])
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = _ids(cfg, 2, 41)
    with torch.no_grad():
        err = max_rel_err(ours(ids).logits, hf(ids).logits)
    print(f"{name}: max rel err {err:.2e}")
    assert err < TOL


def _image_prompt(cfg, n_tiles_per_image, text_len=9):
    """input_ids with one run of image tokens per image (tiles x tokens_per_tile each), text around."""
    per_tile = cfg.vision.tokens_per_tile
    pieces = []
    for n_tiles in n_tiles_per_image:
        pieces.append(_ids(cfg, 1, text_len)[0])
        pieces.append(torch.tensor([cfg.boi_token_index]))
        pieces.append(torch.full((n_tiles * per_tile,), cfg.image_token_index))
        pieces.append(torch.tensor([cfg.eoi_token_index]))
    pieces.append(_ids(cfg, 1, text_len)[0])
    return torch.cat(pieces)[None]


@pytest.mark.parametrize("name", ["top1_shared_chunk8_nope2", "top2_noshared_interleaved_noqknorm"])
def test_image_logits_match_hf(name):
    cfg = tiny_config(vision=True, **TEXT_CONFIGS[name])
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    tiles = [3, 1]  # two images: 2 tiles + global, then a single tile
    ids = _image_prompt(cfg, tiles)
    size = cfg.vision.image_size
    pixel_values = torch.randn(sum(tiles), 3, size, size)
    with torch.no_grad():
        a = ours(ids, pixel_values=pixel_values)
        b = hf(input_ids=ids, pixel_values=pixel_values)
    err = max_rel_err(a.logits, b.logits)
    print(f"{name} + images: max rel err {err:.2e}")
    assert err < TOL
    assert max_rel_err(a.image_hidden_states, b.image_hidden_states) < TOL


def test_batch_with_right_padding_matches_hf():
    cfg = tiny_config(vision=False)
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = _ids(cfg, 3, 29)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 11:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert max_rel_err(a[keep], b[keep]) < TOL


def test_batch_with_left_padding_matches_hf():
    # HF applies NoPE temperature tuning by raw index rather than by position, so left padding only
    # agrees with it where floor_scale keeps the temperature at 1; positions, RoPE and chunk boundaries
    # still count from the first real token on both sides.
    cfg = tiny_config(vision=False, floor_scale=4096)
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = _ids(cfg, 3, 29)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    keep = mask.bool()
    assert max_rel_err(a[keep], b[keep]) < TOL


def test_left_padded_row_equals_unpadded_sequence():
    cfg = tiny_config(vision=False)  # temperature tuning active (floor_scale=4)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = _ids(cfg, 1, 23)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask).logits[:, 6:]
    assert max_rel_err(left, alone) < 1e-5


def test_loss_matches_hf_and_ignores_masked_labels():
    cfg = tiny_config(vision=False)
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids = _ids(cfg, 2, 19)
    labels = ids.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        a = ours(ids, labels=labels)
        b = hf(ids, labels=labels)
    assert abs(float(a.loss) - float(b.loss)) < 1e-5 * float(b.loss)
    # Reference: mean next-token NLL over labelled targets only.
    logp = torch.log_softmax(a.logits[:, :-1].double(), -1)
    target = labels[:, 1:]
    valid = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    assert abs(float(nll[valid].mean()) - float(a.loss)) < 1e-5
    # num_items_in_batch (HF's name): the summed NLL over that count, as int, float or tensor.
    with torch.no_grad():
        for items in (int(valid.sum()) + 5, 3.5, torch.tensor(40.0)):
            summed = ours(ids, labels=labels, num_items_in_batch=items).loss
            assert abs(float(summed) - float(nll[valid].sum()) / float(items)) < 1e-5 * float(summed)
    for bad in (0, -3, float("nan"), True):
        with pytest.raises(ValueError, match=r"num_items_in_batch=.*; expected a positive count"):
            ours(ids, labels=labels, num_items_in_batch=bad)


def test_loss_ignores_padding_positions_even_with_unmasked_labels():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = _ids(cfg, 1, 12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(ids, labels=ids).loss
        left = model(padded, attention_mask=mask, labels=padded).loss  # labels not masked on purpose
    assert abs(float(alone) - float(left)) < 1e-5


def test_aux_loss_is_one_for_uniform_router():
    cfg = tiny_config(vision=False, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg)
    ids = _ids(cfg, 2, 16)
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            if layer.is_moe:
                layer.feed_forward.router.weight.zero_()
        # Equal probabilities: aux = E * sum_e f_e / E = 1 whatever the assignment.
        assert abs(float(model(ids, with_aux_loss=True).aux_loss) - 1.0) < 1e-6
    assert model.train()(ids).aux_loss is not None
    assert model.eval()(ids).aux_loss is None


def test_load_balancing_loss_values_and_padding_mask():
    from scout_mm.moe import load_balancing_loss

    n_experts, tokens = 4, 10
    logits = torch.zeros(tokens, n_experts)
    logits[:, 0] = 30.0  # every token sends (nearly) all probability to expert 0 ...
    ids = torch.stack([torch.zeros(tokens, dtype=torch.long), torch.ones(tokens, dtype=torch.long)], 1)
    # ... and both slots go to experts 0 and 1: f = (1/2, 1/2, 0, 0), p ~ (1, 0, 0, 0) -> E * 1/2 = 2.
    assert abs(float(load_balancing_loss(logits, ids)) - 2.0) < 1e-4
    # Padding tokens are left out: balanced real tokens + collapsed padding = balanced.
    real = torch.zeros(tokens, n_experts)
    real_ids = torch.arange(2 * tokens).view(tokens, 2) % n_experts
    mask = torch.tensor([True] * tokens + [False] * tokens)
    both = load_balancing_loss(torch.cat([real, logits]), torch.cat([real_ids, ids]), mask)
    assert abs(float(both) - 1.0) < 1e-6


def test_aux_loss_backpropagates_to_router():
    cfg = tiny_config(vision=False, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg).train()
    out = model(_ids(cfg, 2, 12))
    out.aux_loss.backward()
    router = model.language_model.model.layers[0].feed_forward.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_gradients_flow_to_experts_and_vision():
    cfg = tiny_config(vision=True, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg).train()
    ids = _image_prompt(cfg, [1])
    pixel_values = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    out = model(ids, pixel_values=pixel_values, labels=ids)
    (out.loss + 0.01 * out.aux_loss).backward()
    experts = model.language_model.model.layers[0].feed_forward.experts
    assert experts.gate_up_proj.grad.abs().sum() > 0
    assert model.vision_model.patch_embedding.linear.weight.grad.abs().sum() > 0


def test_chunked_attention_never_builds_a_seq_by_seq_mask(monkeypatch):
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            seen.append(tuple(attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cfg = replace(tiny_config(vision=False), max_position_embeddings=8192, attention_chunk_size=64)
    model = ScoutForConditionalGeneration(cfg).eval()
    seq = 2600
    with torch.no_grad():
        model(_ids(cfg, 1, seq))  # unpadded: chunk reshape + plain causal, no mask at all
        assert seen == []
        mask = torch.ones(1, seq, dtype=torch.long)
        mask[0, :5] = 0
        model(_ids(cfg, 1, seq), attention_mask=mask)  # padded: blockwise masks
    assert seen and max(s[-2] for s in seen) <= 1024
    assert all(s[-2] * s[-1] < seq * seq // 2 for s in seen)


def test_routed_experts_only_compute_routed_tokens(monkeypatch):
    from scout_mm.kernels import reference

    rows = []
    original = reference.moe_experts

    def spy(hidden, topk_weights, topk_ids, gate_up_proj, down_proj):
        rows.append((hidden.shape[0], topk_ids.numel()))
        return original(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)

    monkeypatch.setattr(reference, "moe_experts", spy)
    calls = []
    matmul = torch.Tensor.__matmul__

    def counting_matmul(a, b):
        calls.append(a.shape[0])
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
    cfg = tiny_config(vision=False, num_experts_per_tok=2, num_local_experts=8)
    model = ScoutForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model(_ids(cfg, 2, 10))
    tokens = 20
    assert rows and all(r == (tokens, tokens * 2) for r in rows)
    # Two matmuls per non-empty expert; all rows together are exactly tokens * top_k per MoE layer.
    n_moe = len(cfg.text.moe_layers)
    assert sum(calls) == 2 * tokens * 2 * n_moe


def test_sequence_longer_than_maximum_is_rejected():
    cfg = replace(tiny_config(vision=False), max_position_embeddings=32)
    model = ScoutForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(_ids(cfg, 1, 33))


def test_image_token_count_mismatch_is_rejected():
    cfg = tiny_config(vision=True)
    model = ScoutForConditionalGeneration(cfg)
    ids = _image_prompt(cfg, [2])
    size = cfg.vision.image_size
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=torch.randn(3, 3, size, size))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)
    with pytest.raises(ValueError, match="pixel_values shape"):
        model(ids, pixel_values=torch.randn(2, 3, size + 14, size + 14))


def test_bad_inputs_are_rejected():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, cfg.text.vocab_size]]))
    with pytest.raises(ValueError, match="text-only"):
        model(_ids(cfg, 1, 4), pixel_values=torch.randn(1, 3, 56, 56))
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"input_ids of shape \(\d, \d\); expected \(batch, seq\)"):
            model(empty)  # was "cannot reshape tensor of 0 elements"
    ids = _ids(cfg, 1, 6)
    with pytest.raises(ValueError, match="left or right padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))


def test_attention_dropout_is_refused_in_training_not_ignored():
    """No kernel drops attention probabilities: training with the setting must say so, not silently differ from
    HF; inference ignores it, as HF does in eval mode."""
    cfg = replace(tiny_config(vision=False), attention_dropout=0.1)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = _ids(cfg, 1, 6)
    model(ids)
    with pytest.raises(NotImplementedError, match="attention_dropout=0.1: dropout on attention"):
        model.train()(ids, labels=ids)


# ------------------------------------------------------------------------------------ projection fusion
@pytest.mark.parametrize("name", ["top1_shared_chunk8_nope2", "top2_noshared_interleaved_noqknorm"])
def test_fused_projections_give_the_same_logits(name):
    # q|k|v and gate|up as one matmul each (shared experts and dense MLPs): same logits (fp32, PyTorch path).
    from scout_mm.fusion import FusedLinear, fuse_projections

    cfg = tiny_config(vision=False, **TEXT_CONFIGS[name])
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = _ids(cfg, 2, 29)
    with torch.no_grad():
        ref = model(ids).logits
        n_params = sum(p.numel() for p in model.parameters())
        fuse_projections(model)
        fuse_projections(model)  # idempotent
        out = model(ids).logits
    layers = model.language_model.model.layers
    assert all(isinstance(layer.self_attn.qkv_proj, FusedLinear) for layer in layers)
    assert not hasattr(layers[0].self_attn, "q_proj")
    mlps = [m for m in model.modules() if type(m).__name__ == "SwiGLU"]
    assert mlps and all(isinstance(m.gate_up_proj, FusedLinear) for m in mlps)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert max_rel_err(out, ref) < 1e-6


def test_fused_model_refuses_state_dict_until_unfused():
    from scout_mm.fusion import fuse_projections, is_fused, unfuse_projections

    cfg = tiny_config(vision=True)
    model = ScoutForConditionalGeneration(cfg).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)
    assert is_fused(model)
    with pytest.raises(
        RuntimeError, match=r"layers\.0\.self_attn\.qkv_proj fuses q_proj\|k_proj\|v_proj.*unfuse"
    ):
        model.state_dict()
    with pytest.raises(RuntimeError, match="fuses"):
        model.load_state_dict(original)
    unfuse_projections(model)
    assert not is_fused(model)
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_forcing_triton_on_cpu_tensors_without_the_interpreter_is_named(monkeypatch):
    """Was Triton's "0 active drivers" from deep inside a kernel launch."""
    from scout_mm import kernels

    monkeypatch.setenv("SCOUT_MM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="SCOUT_MM_KERNELS=triton on CPU tensors"):
        kernels.use_triton(torch.zeros(2))
    monkeypatch.setenv("SCOUT_MM_KERNELS", "auto")
    monkeypatch.setenv("SCOUT_MM_FUSED", "on")
    with pytest.raises(ValueError, match="SCOUT_MM_FUSED=on on CPU tensors"):
        kernels.use_fused(torch.zeros(2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_fused(torch.zeros(2))
    monkeypatch.setenv("SCOUT_MM_KERNELS", "triton")
    assert kernels.use_triton(torch.zeros(2))
