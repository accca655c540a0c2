"""GPU checks of the batch-1 decode step as it runs in generation (skipped without CUDA): programmatic dependent
launch on every kernel of the step (``SCOUT_MM_PDL``), the decode-only fusions (split merge inside the decode
attention kernel, routing-free Int4 MoE with the slot sum in the down launch) and the decode graph kept across
``generate`` calls. Inputs are fresh random draws every run."""

from __future__ import annotations

import re

import pytest
import torch

from scout_mm.fusion import fuse_projections, fuse_shared_expert
from scout_mm.generation import GraphedDecode, decode_one_token, generate_ids, prefill
from scout_mm.model import ScoutForConditionalGeneration
from scout_mm.quant import QuantConfig, quantize_model
from tests.helpers import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def int4_decode_model(seed: int = 0):
    """A small bf16 model in the layout load_quantized returns: Int4 layers, q|k|v and gate|up fused, the shared
    expert folded into the routed stacks; RoPE (chunked) and NoPE (temperature-tuned) layers."""
    torch.manual_seed(seed)
    cfg = tiny_config(vision=False, hidden_size=256, intermediate_size=256, intermediate_size_mlp=512,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                      num_experts_per_tok=2, use_shared_expert=True, attention_chunk_size=64,
                      max_position_embeddings=1024)  # fmt: skip
    model = ScoutForConditionalGeneration(cfg).eval()
    model = quantize_model(model, QuantConfig(group_size=128)).cuda().to(torch.bfloat16)
    return fuse_shared_expert(fuse_projections(model))


def _decode_logits(model, monkeypatch, pdl: str, graphed: bool, prompt, steps: int = 3):
    """Logits of ``steps`` decode steps after prefilling ``prompt`` into a fresh cache."""
    from scout_mm.cache import KVCache

    monkeypatch.setenv("SCOUT_MM_PDL", pdl)
    cache = KVCache(model.config.text, 1, "cuda", torch.bfloat16)
    cache.reserve(0, prompt.shape[1] + steps + 1)
    out = []
    with torch.no_grad():
        embeds, _ = model.embed_inputs(prompt, validate=False)
        prefill(model, cache, 0, embeds, 512)
        tokens = prompt[:, -1:].clone()
        for step in range(steps):
            positions = torch.full((1, 1), prompt.shape[1] + step, device="cuda")
            if graphed:
                if step == 0:  # the warm-up inside the capture runs this step once: redo it as a replay
                    graph = GraphedDecode(model, cache, tokens, positions)
                logits = graph(tokens, positions).clone()
            else:
                logits = decode_one_token(model, tokens, positions, cache)
            out.append(logits.float())
            tokens = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


def test_pdl_decode_step_is_exact(monkeypatch):
    # PDL changes when kernels start, never what they compute: eager and graphed, PDL on and off, bit-identical.
    model = int4_decode_model()
    prompt = torch.randint(3, 290, (1, 150), device="cuda")  # > one attention chunk: the ring wrapped
    ref = _decode_logits(model, monkeypatch, "off", graphed=False, prompt=prompt)
    modes = ["auto"] + (["on"] if _hopper() else [])
    for pdl in modes:
        for graphed in (False, True):
            got = _decode_logits(model, monkeypatch, pdl, graphed, prompt)
            assert torch.equal(got, ref), (pdl, graphed, float((got - ref).abs().max()))


_MEMORY = re.compile(r"\b(st\.global|atom\.|red\.|ld\.global|cp\.async|ld\.volatile)")
# Kernels of the decode step that must be compiled with PDL, and which may read (constant weights) before the wait.
_STEP_KERNELS = ("_rms_norm_kernel", "_router_kernel", "_write_kv_kernel", "_rope_qk_norm_kernel",
                 "_decode_split_kernel", "_gemv_kernel")  # fmt: skip
_PREFETCH_OK = ("_gemv_kernel", "_router_kernel", "_rms_norm_kernel")  # load constant weights early


def _compiled(fn):
    """(kernel name, ptx) of every compiled specialisation of a Triton JIT function, except GEMVs compiled with
    ``PDL=1`` (trigger before the wait): a form that only benchmarks and the GEMV's own PDL test launch (when this
    test runs in one process with tests/test_kernels_int4.py), never the decode step (form 2)."""
    caches = getattr(fn, "device_caches", {})
    name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
    pdl_arg = (fn.arg_names.index("PDL"),) if "PDL" in getattr(fn, "arg_names", ()) else None
    for entry in caches.values():
        kernels = entry[0] if isinstance(entry, tuple) else entry
        for kernel in getattr(kernels, "values", lambda: [])():
            constants = getattr(getattr(kernel, "src", None), "constants", {})
            if name == "_gemv_kernel" and pdl_arg and constants.get(pdl_arg) == 1:
                continue
            ptx = getattr(kernel, "asm", {}).get("ptx")
            if ptx:
                yield name, ptx


@pytest.mark.skipif(not _hopper(), reason="PDL needs sm_90")
def test_pdl_kernels_wait_before_touching_memory(monkeypatch):
    # The PDL contract (scout_mm/kernels/launch.py): in the compiled code of every kernel the step launched with
    # PDL, griddepcontrol.wait comes before any store or atomic, and before any load except the early loads of
    # constant weights (a GEMV's first tile, the router's and the norms' weights); the trigger comes after it.
    from scout_mm.kernels import flash_decode, fused, int4

    model = int4_decode_model(1)
    prompt = torch.randint(3, 290, (1, 100), device="cuda")
    _decode_logits(model, monkeypatch, "on", graphed=True, prompt=prompt, steps=2)
    seen = set()
    for module in (fused, flash_decode, int4):
        for fn in vars(module).values():
            if not hasattr(fn, "device_caches"):
                continue
            for name, ptx in _compiled(fn):
                if "griddepcontrol.wait" not in ptx:
                    continue
                seen.add(name)
                before, after = ptx.split("griddepcontrol.wait", 1)
                body = before[before.find("{") :]  # skip the parameter list
                hits = _MEMORY.findall(body)
                if name in _PREFETCH_OK:
                    assert not [h for h in hits if h != "ld.global"], (name, hits)
                else:
                    assert not hits, (name, hits)
                assert "griddepcontrol.launch_dependents" not in before, name
    assert set(_STEP_KERNELS) <= seen, set(_STEP_KERNELS) - seen


@pytest.mark.parametrize("paged_block", [None, 64])
@pytest.mark.parametrize("pdl", ["off", "auto"])
def test_decode_attention_merged_in_kernel_with_q_scale(monkeypatch, paged_block, pdl):
    # The split merge inside the split kernel (last split to arrive) and the in-kernel NoPE q scale vs the
    # separate merge kernel and the reference, eager and as replays of a CUDA graph on new inputs.
    from scout_mm.kernels import flash_decode
    from scout_mm.kernels.reference import decode_attention as decode_reference

    monkeypatch.setenv("SCOUT_MM_PDL", pdl)
    batch, n_heads, n_kv_heads, head_dim, capacity = 2, 40, 8, 128, 9000
    q = torch.randn(batch, n_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([capacity, 777], device="cuda", dtype=torch.int32)
    q_scale = 1 + torch.rand(batch, 1, device="cuda")
    if paged_block:
        n_blocks = batch * (capacity // paged_block + 1)
        k = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        table = torch.randperm(n_blocks, device="cuda").view(batch, -1).int()
    else:
        k = torch.randn(batch, n_kv_heads, capacity, head_dim, device="cuda", dtype=torch.bfloat16)
        table = None
    v = torch.randn_like(k)
    kw = dict(scale=head_dim**-0.5, kv_lens=lens, block_table=table, q_scale=q_scale)

    def both():
        monkeypatch.setattr(flash_decode, "FUSED_MERGE", True)
        fused = flash_decode.decode_attention(q, k, v, **kw)
        monkeypatch.setattr(flash_decode, "FUSED_MERGE", False)
        separate = flash_decode.decode_attention(q, k, v, **kw)
        return fused, separate

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        both()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (out_g, lse_g), (sep_g, sep_lse_g) = both()
    for _ in range(2):
        q.normal_()
        q_scale.uniform_(1, 2)
        lens[1] = int(torch.randint(1, capacity, ()))
        graph.replay()
        (out, lse), (sep, sep_lse) = both()
        # the reference on the query times the fp32 scale, rounded once to bf16, as the kernels (and HF) round it
        q_scaled = (q * q_scale[:, None, :, None]).to(q.dtype).float()
        ref_out, ref_lse = decode_reference(q_scaled, k.float(), v.float(), **{**kw, "q_scale": None})
        for got, got_lse in ((out, lse), (out_g, lse_g), (sep_g, sep_lse_g)):
            assert float((got.float() - sep.float()).abs().max()) <= 2**-7 * float(sep.float().abs().max())
            assert float((got_lse - sep_lse).abs().max()) < 1e-4
        rel = float((out.float() - ref_out).norm() / ref_out.norm())
        assert rel < 2e-2 and float((lse - ref_lse).abs().max()) < 1e-2


@pytest.mark.parametrize("tokens, top_k", [(1, 2), (1, 3), (4, 3), (8, 2)])
def test_int4_moe_direct_layout_bf16(monkeypatch, tokens, top_k):
    # Scout-like expert shapes: rows straight from the routing ids and the slot sum in the down launch equal the
    # sorted layout + routing kernel + _sum_rows exactly, with a non-local slot.
    from scout_mm.kernels import int4
    from tests.test_kernels_int4 import _moe_problem, _moe_reference, rel

    x, weights, ids, gate_up, down = _moe_problem(
        tokens, 1024, 512, 17, top_k, 128, True, torch.bfloat16, "cuda"
    )
    ids[0, -1] = 20  # owned by another rank
    direct = int4.int4_moe_experts(x, weights, ids, gate_up, down, 128)
    monkeypatch.setattr(int4, "DIRECT_DECODE_MOE", False)
    sorted_layout = int4.int4_moe_experts(x, weights, ids, gate_up, down, 128)
    assert torch.equal(direct, sorted_layout)
    assert rel(direct, _moe_reference(x.float(), weights.float(), ids, gate_up, down, 128)) < 2e-2


def test_generate_keeps_the_decode_graph_and_matches_fresh_calls():
    # Calls with kept graph + cache == fresh calls; later calls that fit the first one's cache capture nothing; a
    # longer generation, another batch size, or changed modules get a new cache and graph.
    from scout_mm import generation

    model = int4_decode_model(2)
    prompts = [torch.randint(3, 290, (1, n), device="cuda") for n in (130, 40, 90)]
    fresh = [
        generate_ids(model, p, max_new_tokens=12, eos_token_id=[], keep_graph=False).sequences
        for p in prompts
    ]
    assert generation._STATE_ATTR not in model.__dict__
    kept, graphs = [], []
    for p in prompts:
        kept.append(generate_ids(model, p, max_new_tokens=12, eos_token_id=[]).sequences)
        graphs.append(model.__dict__[generation._STATE_ATTR].graph)
    for a, b in zip(kept, fresh, strict=True):
        assert torch.equal(a, b)
    assert graphs[0] is graphs[1] is graphs[2] is not None
    # 90 + 200 tokens > the 256 (one block) the first call's cache holds: a fresh cache and graph
    longer = generate_ids(model, prompts[2], max_new_tokens=200, eos_token_id=[]).sequences
    assert model.__dict__[generation._STATE_ATTR].graph is not graphs[0]
    assert torch.equal(longer, generate_ids(model, prompts[2], max_new_tokens=200, eos_token_id=[],
                                            keep_graph=False).sequences)  # fmt: skip
    batch2 = torch.randint(3, 290, (2, 30), device="cuda")
    generate_ids(model, batch2, max_new_tokens=4, eos_token_id=[])
    assert model.__dict__[generation._STATE_ATTR].graph is not graphs[0]
    # new modules (here: the LM head replaced by a copy): another key, a new graph, the same tokens
    head = model.language_model.lm_head
    model.language_model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=False).cuda()
    model.language_model.lm_head.weight.data.copy_(head.weight.data.float())
    model.language_model.lm_head.to(torch.bfloat16)
    again = generate_ids(model, prompts[0], max_new_tokens=12, eos_token_id=[]).sequences
    assert torch.equal(again, fresh[0])
    generation.release_decode_state(model)
    assert generation._STATE_ATTR not in model.__dict__
