"""GPU checks of the model's reference paths (skipped without CUDA): bf16 against fp32, the grouped-GEMM
MoE against the per-expert loop, and the chunk-reshape attention against the blockwise-masked path."""

from __future__ import annotations

import pytest
import torch

from scout_mm.kernels import reference
from scout_mm.model import ScoutForConditionalGeneration
from tests.helpers import max_rel_err, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("tokens, top_k, n_experts", [(1, 1, 16), (37, 2, 16), (4096, 2, 16), (513, 1, 5)])
def test_grouped_mm_moe_matches_loop(tokens, top_k, n_experts, monkeypatch):
    hidden, inter = 512, 256
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(n_experts, hidden, 2 * inter, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    down = torch.randn(n_experts, inter, hidden, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    logits = torch.randn(tokens, n_experts, device="cuda")
    weights, ids = torch.topk(logits, top_k, dim=-1)
    weights = torch.sigmoid(weights).to(torch.bfloat16)
    fast = reference.moe_experts(x, weights, ids, gate_up, down)
    monkeypatch.setattr(reference, "_grouped_mm_ok", lambda *a: False)
    loop = reference.moe_experts(x, weights, ids, gate_up, down)
    assert max_rel_err(fast.float(), loop.float()) < 2e-2


@pytest.mark.parametrize("seq, chunk", [(4096, 1024), (3000, 512), (777, 128)])
def test_chunk_reshape_matches_blockwise_mask(seq, chunk):
    q = torch.randn(2, 8, seq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, seq, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, seq, 128, device="cuda", dtype=torch.bfloat16)
    fast = reference.attention(q, k, v, scale=128**-0.5, chunk_size=chunk)
    masked = reference.attention(
        q, k, v, scale=128**-0.5, chunk_size=chunk, kv_start=torch.zeros(2, device="cuda")
    )
    assert max_rel_err(fast.float(), masked.float()) < 2e-2


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_model_bf16_close_to_fp32_with_images(kernels, monkeypatch):
    monkeypatch.setenv("SCOUT_MM_KERNELS", kernels)
    cfg = tiny_config(vision=True, num_experts_per_tok=2, hidden_size=128, head_dim=32, intermediate_size=128)
    model = ScoutForConditionalGeneration(cfg).cuda().eval()
    ids = torch.randint(3, cfg.image_token_index - 5, (2, 300), device="cuda")
    ids[0, 5 : 5 + cfg.vision.tokens_per_tile] = cfg.image_token_index
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda")
    with torch.no_grad():
        ref = model(ids, pixel_values=pixels).logits
        bf16 = model.to(torch.bfloat16)(ids, pixel_values=pixels).logits
    assert torch.isfinite(bf16).all()
    assert max_rel_err(bf16.float(), ref) < 1e-1  # 4 layers + vision tower of bf16 rounding
    # The argmax agrees almost everywhere (bf16 may flip near-ties).
    assert (bf16.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_training_step_on_gpu_reduces_loss(kernels, monkeypatch):
    monkeypatch.setenv("SCOUT_MM_KERNELS", kernels)
    torch.manual_seed(0)
    cfg = tiny_config(vision=False, num_experts_per_tok=2, hidden_size=128, head_dim=32)
    model = ScoutForConditionalGeneration(cfg).cuda().to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(3, 290, (4, 128), device="cuda")
    losses = []
    for _ in range(20):
        out = model(ids, labels=ids)
        (out.loss + 0.01 * out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("kernels", ["reference", "auto"])
def test_graphed_decode_matches_eager_decode(kernels, monkeypatch):
    monkeypatch.setenv("SCOUT_MM_KERNELS", kernels)
    cfg = tiny_config(
        vision=False, num_experts_per_tok=2, hidden_size=128, head_dim=32, max_position_embeddings=4096
    )
    model = ScoutForConditionalGeneration(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(3, 290, (3, 50), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], cuda_graph=True)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], cuda_graph=False)
    assert torch.equal(graphed, eager)


def test_gpu_generation_matches_cpu_fp32_first_tokens():
    cfg = tiny_config(vision=True, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (1, 30))
    cpu = model.generate(ids, max_new_tokens=20, eos_token_id=[])
    gpu = model.cuda().generate(ids.cuda(), max_new_tokens=20, eos_token_id=[])
    assert torch.equal(cpu, gpu.cpu())


def test_text_api_with_images_on_gpu():
    import scout_mm
    from scout_mm import Processor, ScoutConfig

    cfg = ScoutConfig.from_preset("tiny", num_hidden_layers=2)
    model = ScoutForConditionalGeneration(cfg).cuda().to(torch.bfloat16).eval()
    processor = Processor.from_config(cfg)
    from PIL import Image

    image = Image.new("RGB", (300, 200), (20, 200, 40))
    text = scout_mm.generate(model, processor, "What colour?", images=[image], max_new_tokens=5)
    assert isinstance(text, str)


def _fused_vs_plain_model():
    cfg = tiny_config(
        vision=False, num_experts_per_tok=2, hidden_size=128, head_dim=32, max_position_embeddings=4096
    )
    return ScoutForConditionalGeneration(cfg).cuda().to(torch.bfloat16).eval()


def test_fused_inference_kernels_match_the_pytorch_path_bf16(monkeypatch):
    # norms, RoPE + QK-norm, SwiGLU, router (few tokens) and KV writes fused, and fused projections, vs
    # SCOUT_MM_FUSED=off: bf16 logits within a few ulps of accumulated rounding, argmax nearly everywhere.
    from scout_mm.fusion import fuse_projections

    model = _fused_vs_plain_model()
    ids = torch.randint(3, 290, (2, 200), device="cuda")
    with torch.no_grad():
        monkeypatch.setenv("SCOUT_MM_FUSED", "off")
        ref = model(ids).logits.float()
        monkeypatch.setenv("SCOUT_MM_FUSED", "auto")
        out = model(ids).logits.float()
        fuse_projections(model)
        out_proj = model(ids).logits.float()
        step = model(ids[:1, :16]).logits.float()  # 16 tokens: the router kernel path
        monkeypatch.setenv("SCOUT_MM_FUSED", "off")
        step_ref = model(ids[:1, :16]).logits.float()
    for fast, slow in ((out, ref), (out_proj, ref), (step, step_ref)):
        assert max_rel_err(fast, slow) < 3e-2
        assert (fast.argmax(-1) == slow.argmax(-1)).float().mean() > 0.95


def test_graphed_decode_with_fusions_matches_eager_decode():
    from scout_mm.fusion import fuse_projections

    model = fuse_projections(_fused_vs_plain_model())
    ids = torch.randint(3, 290, (3, 50), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :9] = 0
    graphed = model.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], cuda_graph=True)
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[], cuda_graph=False)
    assert torch.equal(graphed, eager)
