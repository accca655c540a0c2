"""Weight prefetch into the L2 during the latency-bound kernels of a decode step.

At batch-1 decode every matmul streams its weight from HBM, and between the matmuls of a layer run short kernels
that barely touch HBM: RoPE, the KV write and decode attention between q|k|v and o, the router between o and the
experts, the next layer's norm between the experts and its q|k|v. :class:`WeightPrefetch` hooks the end of each
matmul and, on a second CUDA stream, asks the L2 (:func:`scout_mm.kernels.prefetch.l2_prefetch`) for the first
bytes of the weights that come next, up to a budget per window:

- after q|k|v (``"attention"``): o_proj, then the feed-forward's always-used weights (the shared expert, folded
  or not; a dense MLP);
- after o_proj (``"router"``): where the attention window stopped;
- after the feed-forward (``"norm"``): the next layer's q|k|v (the last layer's: the LM head).

Routed experts are not known before the router and are never asked for. A window asks for at most the two
matmuls after it, and never twice for the same bytes within one forward. A prefetch is a hint (nothing is
written, nothing waits for it), so outputs are bit-identical with or without it; the second stream joins the
main one at the end of the text model, so a captured decode graph contains it.

    handle = enable_weight_prefetch(model)      # load_quantized does it
    disable_weight_prefetch(model)

Install it after the inference fusions (:mod:`scout_mm.fusion`), which replace the modules it hooks, and again
after changing them. Forwards of more than ``max_tokens`` tokens (prefill) ask for nothing. On devices without
the instruction (compute capability < 9.0, CPU) nothing is installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from scout_mm.kernels import prefetch as l2

# Bytes per window. H100 (bench/bench_int4.py --sections prefetch): see bench/results/int4_decode_step_h100.md.
DEFAULT_BUDGETS = {"attention": 32 << 20, "router": 8 << 20, "norm": 8 << 20}
WINDOWS = tuple(DEFAULT_BUDGETS)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _module_tensors(modules) -> list[torch.Tensor]:
    """Parameters and buffers of ``modules``, the small ones first (scales, zeros, biases before the weights)."""
    tensors = [t for m in modules for t in itertools.chain(m.parameters(), m.buffers())]
    return sorted(tensors, key=_nbytes)


def _stack_slice(stacks: nn.Module, expert: int) -> list[torch.Tensor]:
    """Expert ``expert``'s gate_up then down packed tensors of Int4 expert stacks (scales and zeros first)."""
    out = []
    for part in ("gate_up", "down"):
        for name in ("scales", "zeros", "qweight"):
            t = getattr(stacks, f"{part}_{name}", None)
            if t is not None:
                out.append(t[expert])
    return out


def _qkv_modules(attn: nn.Module) -> list[nn.Module]:
    return [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]


def _ffn_tensors(ffn: nn.Module) -> list[torch.Tensor]:
    """The feed-forward weights every token reads: a dense MLP's, or an MoE block's shared expert (as the last
    expert of the Int4 stacks when folded). Routed experts depend on the router and are left out."""
    if not hasattr(ffn, "router"):
        return _module_tensors([ffn])
    if ffn.shared_slot:
        stacks = ffn.experts.experts
        return _stack_slice(stacks, stacks.n_experts - 1)
    return _module_tensors([ffn.shared_expert]) if ffn.shared_expert is not None else []


def _ffn_last(ffn: nn.Module) -> nn.Module:
    """The module whose forward ends the feed-forward block."""
    if not hasattr(ffn, "router"):
        return ffn
    if ffn.shared_slot or ffn.shared_expert is None:
        return ffn.experts
    return ffn.shared_expert  # run after the routed experts (scout_mm.moe.layer.MoE.forward)


def _text_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(text model with ``layers``, LM head or None) of a ScoutForConditionalGeneration / ScoutForCausalLM."""
    lm = getattr(model, "language_model", model)
    text = getattr(lm, "model", None)
    if text is None or not hasattr(text, "layers"):
        raise TypeError(f"weight prefetch needs a scout_mm model; got {type(model).__name__}")
    return text, getattr(lm, "lm_head", None)


class WeightPrefetch:
    """The hooks of :func:`enable_weight_prefetch`. ``issue(ranges, device)`` asks for (address, bytes) ranges
    (default: :func:`scout_mm.kernels.prefetch.l2_prefetch` on a side stream; tests pass a recorder)."""

    def __init__(self, model: nn.Module, budgets: dict | None = None, max_tokens: int = 16,
                 issue: Callable | None = None):  # fmt: skip
        budgets = dict(DEFAULT_BUDGETS if budgets is None else budgets)
        unknown = set(budgets) - set(WINDOWS)
        if unknown:
            raise ValueError(f"unknown prefetch windows {sorted(unknown)}; expected some of {WINDOWS}")
        if any(int(v) < 0 for v in budgets.values()):
            raise ValueError(f"prefetch budgets must be >= 0 bytes; got {budgets}")
        self.budgets = {w: int(budgets.get(w, 0)) for w in WINDOWS}
        self.max_tokens = max_tokens
        self._issue = issue if issue is not None else self._issue_l2
        self._real = issue is None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: set[torch.device] = set()
        self.cursor = (0, 0)  # (stage, bytes of it already asked for) within the current forward
        self.active = False
        self.bytes_asked = 0  # in the current / last forward
        text, head = _text_parts(model)
        self.stages: list[Callable[[], list[torch.Tensor]]] = []
        self.handles = [text.register_forward_pre_hook(self._begin, with_kwargs=True),
                        text.register_forward_hook(self._end)]  # fmt: skip
        for layer in text.layers:
            attn, ffn = layer.self_attn, layer.feed_forward
            first = len(self.stages)
            self.stages += [lambda a=attn: _module_tensors(_qkv_modules(a)),
                            lambda a=attn: _module_tensors([a.o_proj]),
                            lambda f=ffn: _ffn_tensors(f)]  # fmt: skip
            hooks = ((_qkv_modules(attn)[-1], first, "attention"), (attn.o_proj, first + 1, "router"),
                     (_ffn_last(ffn), first + 2, "norm"))  # fmt: skip
            for module, stage, window in hooks:
                if self.budgets[window]:
                    self.handles.append(module.register_forward_hook(self._window_hook(stage, window)))
        if head is not None:
            self.stages.append(lambda h=head: _module_tensors([h]))

    # ---------------------------------------------------------------- hooks
    def _begin(self, module, args, kwargs):
        embeds = args[0] if args else kwargs["inputs_embeds"]
        tokens = embeds.shape[:-1].numel()
        self.active = tokens <= self.max_tokens and (not self._real or l2.supported(embeds.device))
        self.cursor = (0, 0)
        self.bytes_asked = 0

    def _end(self, module, args, output):
        for device in self._pending:
            torch.cuda.current_stream(device).wait_stream(self._streams[device])
        self._pending.clear()

    def _window_hook(self, stage: int, window: str):
        def hook(module, args, output):
            if self.active:
                self.ask(stage, self.budgets[window], args[0].device)

        return hook

    # ---------------------------------------------------------------- planning
    def plan(self, stage: int, budget: int) -> list[tuple[int, int]]:
        """The (address, bytes) ranges the window after ``stage`` asks for with ``budget`` bytes, from where the
        earlier windows of this forward stopped, within the next two stages; advances the cursor."""
        s, done = max(self.cursor, (stage + 1, 0))
        last = min(stage + 3, len(self.stages))
        ranges = []
        while budget > 0 and s < last:
            pos = 0
            for t in self.stages[s]():
                n = _nbytes(t)
                skip = max(done - pos, 0)
                if skip < n and budget > 0 and t.is_contiguous():
                    take = min(n - skip, budget)
                    ranges.append((t.data_ptr() + skip, take))
                    budget -= take
                    done = pos + skip + take
                pos += n
            if done >= pos:
                s, done = s + 1, 0
        self.cursor = max(self.cursor, (s, done))
        return ranges

    def ask(self, stage: int, budget: int, device: torch.device) -> None:
        ranges = self.plan(stage, budget)
        if ranges:
            self.bytes_asked += sum(n for _, n in ranges)
            self._issue(ranges, device)

    def _issue_l2(self, ranges, device):
        side = self._streams.get(device)
        if side is None:
            side = self._streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            l2.l2_prefetch(ranges, device)
        self._pending.add(device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def enable_weight_prefetch(model: nn.Module, budgets: dict | None = None, max_tokens: int = 16,
                           issue: Callable | None = None) -> WeightPrefetch | None:  # fmt: skip
    """Install :class:`WeightPrefetch` on ``model`` (replacing one installed before); ``budgets``: bytes per window
    (``"attention"``, ``"router"``, ``"norm"``; missing = 0, default :data:`DEFAULT_BUDGETS`). Returns it, or
    None where the device cannot prefetch (then nothing is installed) unless ``issue`` is given."""
    disable_weight_prefetch(model)
    if issue is None:
        text, _ = _text_parts(model)
        first = next(itertools.chain(text.layers.parameters(), text.layers.buffers()), None)
        if first is None or not l2.supported(first.device):
            return None
    prefetch = WeightPrefetch(model, budgets, max_tokens, issue)
    model._weight_prefetch = prefetch
    return prefetch


def disable_weight_prefetch(model: nn.Module) -> None:
    """Remove the hooks of :func:`enable_weight_prefetch` (no-op without them)."""
    prefetch = getattr(model, "_weight_prefetch", None)
    if prefetch is not None:
        prefetch.remove()
        model._weight_prefetch = None
