"""Generation speed: scout_mm generate vs HF transformers generate, same weights, same process.

    python bench/bench_generate.py [--models small,scout-slice] [--out bench/results/generate_h100.md]

Models: (a) the ``small`` preset (0.9B total, text path), (b) a Scout-shaped slice: the exact Scout text
dims with 4 layers, top-1 + shared expert, 10.9B parameters. Random bf16 weights (never zeros). Both
implementations share the very same weight tensors (HF's model is built on the meta device and assigned
ours), so only one copy is in GPU memory. Prefill: batch 1, prompts of 2K and 32K tokens, one new token.
Decode: batch 1 and 16, a 128-token prompt, 64 new tokens; decode time = time(65 tokens) - time(1 token).
Each number is the median of 3 timed runs after a warm-up run.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from scout_mm import ScoutConfig, ScoutForConditionalGeneration, count_parameters
from scout_mm.config import write_text_atomically
from scout_mm.generation import generate_ids


def build(name: str):
    if name == "small":
        cfg = ScoutConfig.from_preset("small")
    else:
        cfg = ScoutConfig.from_preset("scout-17b-16e", num_hidden_layers=4)
    cfg.vision = None  # text path: the same weights serve both libraries without the vision tower
    with torch.device("meta"):
        ours = ScoutForConditionalGeneration(cfg)
    ours = ours.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if pname.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    ours.eval()
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    hf_cfg = Llama4TextConfig(**cfg.to_hf(), attn_implementation="sdpa")
    hf_cfg.torch_dtype = torch.bfloat16
    with torch.device("meta"):
        hf = Llama4ForCausalLM(hf_cfg)
    state = {k.removeprefix("language_model."): v for k, v in ours.state_dict().items()}
    if not cfg.text.use_shared_expert:
        for i in cfg.text.moe_layers:
            for proj, shape in (("gate_proj", (cfg.text.intermediate_size, cfg.text.hidden_size)),
                                ("up_proj", (cfg.text.intermediate_size, cfg.text.hidden_size)),
                                ("down_proj", (cfg.text.hidden_size, cfg.text.intermediate_size))):  # fmt: skip
                state[f"model.layers.{i}.feed_forward.shared_expert.{proj}.weight"] = torch.zeros(
                    shape, device="cuda", dtype=torch.bfloat16
                )
    hf.load_state_dict(state, assign=True, strict=True)
    with torch.device("cuda"):  # its inverse frequencies are a non-persistent buffer, still on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    return cfg, ours, hf.eval()


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_ours(model, ids, new):
    return lambda: generate_ids(model, ids, max_new_tokens=new, eos_token_id=[])


def run_hf(model, ids, new):
    def go():
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)  # fmt: skip

    return go


def bench_model(name: str, rows: list[str]) -> None:
    cfg, ours, hf = build(name)
    counts = count_parameters(ours)
    vocab = cfg.text.vocab_size
    label = f"{name} ({counts['total'] / 1e9:.2f}B total)"
    for length in (2048, 32768):
        ids = torch.randint(0, min(vocab, 7900), (1, length), device="cuda")
        t_ours = timed(run_ours(ours, ids, 1))
        t_hf = timed(run_hf(hf, ids, 1))
        rows.append(
            f"| {label} | prefill {length // 1024}K, batch 1 | {length / t_ours:,.0f} tok/s | "
            f"{length / t_hf:,.0f} tok/s | {t_hf / t_ours:.2f}x |"
        )
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    for batch in (1, 16):
        ids = torch.randint(0, min(vocab, 7900), (batch, 128), device="cuda")
        new = 64
        d_ours = timed(run_ours(ours, ids, new + 1)) - timed(run_ours(ours, ids, 1))
        d_hf = timed(run_hf(hf, ids, new + 1)) - timed(run_hf(hf, ids, 1))
        rows.append(
            f"| {label} | decode, batch {batch} | {batch * new / d_ours:,.1f} tok/s | "
            f"{batch * new / d_hf:,.1f} tok/s | {d_hf / d_ours:.2f}x |"
        )
        print(rows[-1], flush=True)
    del ours, hf
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="small,scout-slice")
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    rows = ["| model | case | scout_mm | HF transformers (sdpa) | speed-up |", "|---|---|---|---|---|"]
    for name in args.models.split(","):
        bench_model(name, rows)
    header = (
        f"# Generation: scout_mm vs HF transformers\n\n"
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, date "
        f"{datetime.date.today()}.\nCommand: `python bench/bench_generate.py --models {args.models}`\n\n"
    )
    text = header + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        write_text_atomically(args.out, text)


if __name__ == "__main__":
    main()
