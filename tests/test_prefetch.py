"""Weight prefetch into the L2 during decode (``scout_mm.prefetch``, ``scout_mm.kernels.prefetch``).

CPU: which bytes each window asks for (a recorder replaces the kernel) on small Int4 and float models, folded and
not; and, in the ``TRITON_INTERPRET=1`` subprocess, the kernel's own request layout (its ``LOG`` form). GPU
(marked ``gpu``): the kernel on real addresses, and decode steps (eager and CUDA-graphed) and ``generate_ids``
bit-identical with the prefetch on and off. Fresh random inputs every run.
"""

from __future__ import annotations

import random

import pytest
import torch

from scout_mm.fusion import fuse_projections, fuse_shared_expert
from scout_mm.model import ScoutForConditionalGeneration
from scout_mm.prefetch import WINDOWS, WeightPrefetch, disable_weight_prefetch, enable_weight_prefetch
from scout_mm.quant import QuantConfig, quantize_model
from tests.helpers import INTERPRETED, run_file_under_interpreter, tiny_config


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_interpreter_suite():
    pytest.importorskip("triton")
    run_file_under_interpreter(__file__, OMP_NUM_THREADS="1")


def small_model(seed, quantized=True, fold=True, fuse=True, shared=True):
    torch.manual_seed(seed)
    cfg = tiny_config(vision=False, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64,
                      num_local_experts=4, num_experts_per_tok=1, use_shared_expert=shared, num_hidden_layers=3)  # fmt: skip
    model = ScoutForConditionalGeneration(cfg).eval()
    if quantized:
        model = quantize_model(model, QuantConfig(group_size=32))
    if fuse:
        fuse_projections(model)
    if fold:
        fuse_shared_expert(model)
    return model


class Recorder:
    """Stands in for the kernel: records (window, ranges) in call order."""

    def __init__(self):
        self.calls = []

    def __call__(self, ranges, device):
        self.calls.append(list(ranges))


def _spans(tensors):
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]


def _stage_bytes(prefetch, stage):
    """Byte sequence of a stage as (address) list: the order the windows must walk it in."""
    out = []
    for t in prefetch.stages[stage]():
        start = t.data_ptr()
        out += range(start, start + t.numel() * t.element_size())
    return out


def _decode_forward(model, tokens=1):
    ids = torch.randint(3, 200, (1, tokens))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.skipif(INTERPRETED, reason="CPU reference path; not the interpreter subprocess")
@pytest.mark.parametrize("kind", ["int4-folded", "int4-unfolded", "int4-unfused", "float", "int4-no-shared"])
def test_windows_walk_the_next_weights_in_order_within_their_budgets(kind):
    model = small_model(
        1,
        quantized=kind != "float",
        fold=kind in ("int4-folded", "int4-no-shared"),
        fuse=kind != "int4-unfused",
        shared=kind != "int4-no-shared",
    )
    rec = Recorder()
    # small, ragged budgets so that windows stop inside tensors and the next window continues there
    budgets = {"attention": random.choice([700, 3000, 20000]), "router": random.choice([0, 272, 1000]),
               "norm": random.choice([16, 2000, 9000])}  # fmt: skip
    prefetch = enable_weight_prefetch(model, budgets, issue=rec)
    ref = None
    try:
        out = _decode_forward(model)
        asked = [b for call in rec.calls for a, n in call for b in range(a, a + n)]
        assert len(asked) == len(set(asked)) == prefetch.bytes_asked > 0  # never twice in one forward
        # Replay the windows: each must ask for the next bytes of the stage sequence after its own stage.
        n_stages = len(prefetch.stages)
        order = []  # (stage, window) in forward order
        for layer in range(len(model.language_model.model.layers)):
            for j, window in enumerate(WINDOWS):
                if budgets[window]:
                    order.append((3 * layer + j, window))
        cursor = (0, 0)
        calls = iter(rec.calls)
        for stage, window in order:
            s, done = max(cursor, (stage + 1, 0))
            want, left = [], budgets[window]
            while left and s < min(stage + 3, n_stages):
                seq = _stage_bytes(prefetch, s)
                take = seq[done : done + left]
                want += take
                left -= len(take)
                done += len(take)
                if done >= len(seq):
                    s, done = s + 1, 0
            cursor = max(cursor, (s, done))
            if want:
                got = [b for a, n in next(calls) for b in range(a, a + n)]
                assert got == want, (stage, window)
        assert next(calls, None) is None
        # a prompt longer than max_tokens (prefill) asks for nothing
        rec.calls.clear()
        _decode_forward(model, tokens=prefetch.max_tokens + 1)
        assert rec.calls == [] and prefetch.bytes_asked == 0
    finally:
        disable_weight_prefetch(model)
    ids = torch.randint(3, 200, (1, 1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    enable_weight_prefetch(model, budgets, issue=rec)
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert torch.equal(ref, again) and out.shape == ref.shape


@pytest.mark.skipif(INTERPRETED, reason="CPU reference path; not the interpreter subprocess")
def test_first_window_asks_for_o_proj_then_the_shared_expert_and_never_routed_experts():
    model = small_model(2)
    rec = Recorder()
    prefetch = enable_weight_prefetch(model, {"attention": 1 << 30}, issue=rec)
    _decode_forward(model)
    layer0 = model.language_model.model.layers[0]
    o_spans = _spans(prefetch.stages[1]())
    shared = _spans(prefetch.stages[2]())
    stacks = layer0.feed_forward.experts.experts
    first = rec.calls[0]
    # o_proj whole, then the folded shared expert (the last expert's slices), nothing else
    assert [(a, a + n) for a, n in first] == o_spans + shared
    last = stacks.n_experts - 1
    for a, n in first[len(o_spans) :]:
        for name in ("gate_up_qweight", "down_qweight", "gate_up_scales", "down_scales"):
            t = getattr(stacks, name)
            lo = t.data_ptr()
            hi = lo + t.numel() * t.element_size()
            if lo <= a < hi:  # inside a stack: only in the shared (last) expert's slice
                per = t[0].numel() * t.element_size()
                assert lo + last * per <= a and a + n <= hi
    disable_weight_prefetch(model)
    assert all(not m._forward_hooks for m in model.modules() if m is not model)
    assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(INTERPRETED, reason="CPU reference path; not the interpreter subprocess")
def test_bad_budgets_and_models_raise_and_cpu_installs_nothing():
    model = small_model(3)
    with pytest.raises(ValueError, match="unknown prefetch windows"):
        WeightPrefetch(model, {"attn": 1})
    with pytest.raises(ValueError, match=">= 0 bytes"):
        WeightPrefetch(model, {"norm": -1})
    with pytest.raises(TypeError, match="scout_mm model"):
        WeightPrefetch(torch.nn.Linear(2, 2))
    assert enable_weight_prefetch(model) is None  # CPU: no instruction to issue, nothing installed
    assert not any(m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------ kernel layout (interpreter)
def _random_ranges(rng, count):
    from scout_mm.kernels import prefetch as pf

    ranges = []
    for _ in range(count):
        address = rng.randrange(1 << 30, 1 << 46)
        nbytes = rng.choice([rng.randrange(1, 64), rng.randrange(64, 3 * pf.CHUNK), rng.randrange(1, 40) * pf.CHUNK])
        ranges.append((address, nbytes))
    return ranges


def _expected_requests(ranges, chunk):
    out = []
    for a, n in ranges:
        out += [(a + o, min(chunk, n - o)) for o in range(0, n, chunk)]
    return sorted(out)


@pytest.mark.parametrize("count", [1, 3, 4, 9])
def test_kernel_requests_cover_each_aligned_range_once(count):
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite")
    from scout_mm.kernels import prefetch as pf

    rng = random.Random()
    raw = _random_ranges(rng, count)
    ranges = pf.aligned_ranges(raw)
    for (a, n), (ra, rn) in zip(ranges, [r for r in raw if (r[0] + r[1]) // 16 > -(-r[0] // 16)]):
        assert a % 16 == 0 and n % 16 == 0 and ra <= a and a + n <= ra + rn and a - ra < 16 and ra + rn - a - n < 16
    got = pf.logged_requests(ranges)
    assert sorted(got) == _expected_requests(ranges, pf.CHUNK)
    assert all(a % 16 == 0 and 0 < n <= pf.CHUNK and n % 16 == 0 for a, n in got)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("count", [1, 4, 7])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_kernel_layout_and_requests_on_real_buffers(count):
    from scout_mm.kernels import prefetch as pf

    rng = random.Random()
    buffers = [torch.empty(rng.randrange(1, 3 << 20), dtype=torch.uint8, device="cuda") for _ in range(count)]
    ranges = [(b.data_ptr() + rng.randrange(0, 64), b.numel() - 64) for b in buffers if b.numel() > 64]
    aligned = pf.aligned_ranges(ranges)
    assert sorted(pf.logged_requests(aligned, "cuda")) == _expected_requests(aligned, pf.CHUNK)
    asked = pf.l2_prefetch(ranges, torch.device("cuda"))
    torch.cuda.synchronize()  # a bad request would fault here
    assert asked == (sum(n for _, n in aligned) if pf.supported(torch.device("cuda")) else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_steps_and_generate_identical_with_prefetch(monkeypatch):
    from scout_mm.generation import generate_ids
    from scout_mm.kernels import prefetch as pf
    from tests.test_decode_step_gpu import _decode_logits, int4_decode_model

    if not pf.supported(torch.device("cuda")):
        pytest.skip("needs compute capability >= 9.0 (cp.async.bulk.prefetch.L2)")
    model = int4_decode_model(seed=random.randrange(1000))
    prompt = torch.randint(3, 290, (1, 150), device="cuda")
    off = [_decode_logits(model, monkeypatch, "auto", graphed, prompt) for graphed in (False, True)]
    gen_off = generate_ids(model, prompt, max_new_tokens=6, eos_token_id=[]).sequences
    budgets = {"attention": 1 << 20, "router": 256 << 10, "norm": 256 << 10}
    prefetch = enable_weight_prefetch(model, budgets)
    assert prefetch is not None
    try:
        on = [_decode_logits(model, monkeypatch, "auto", graphed, prompt) for graphed in (False, True)]
        assert prefetch.bytes_asked > 0
        gen_on = generate_ids(model, prompt, max_new_tokens=6, eos_token_id=[]).sequences
    finally:
        disable_weight_prefetch(model)
    for a, b in zip(off, on):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert torch.equal(gen_off, gen_on)
