"""Shared test helpers: random tiny configs and HF reference models built from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scout_mm.config import ScoutConfig, TextConfig, VisionConfig


def tiny_text(**overrides) -> TextConfig:
    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=48,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        no_rope_layer_interval=2,
        floor_scale=4,
        attn_scale=0.3,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return TextConfig(**base)


def tiny_vision(**overrides) -> VisionConfig:
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=56,
        patch_size=14,
        vision_output_dim=48,
        projector_input_dim=48,
        projector_output_dim=48,
    )
    base.update(overrides)
    return VisionConfig(**base)


def tiny_config(vision: bool = True, **text_overrides) -> ScoutConfig:
    return ScoutConfig(
        text=tiny_text(**text_overrides),
        vision=tiny_vision() if vision else None,
        boi_token_index=300,
        eoi_token_index=301,
        image_token_index=302,
    )


def hf_model(cfg: ScoutConfig, seed: int | None = None):
    """An HF Llama 4 model for ``cfg`` with every parameter random (HF zero/one-initialises some)."""
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    hf_cfg = cfg.to_hf()
    if cfg.vision is None:
        model = Llama4ForCausalLM(Llama4TextConfig(**hf_cfg, attn_implementation="eager"))
    else:
        model = Llama4ForConditionalGeneration(Llama4Config(**hf_cfg, attn_implementation="eager"))
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("router.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.06 * torch.randn(p.shape, generator=generator))
            if not cfg.text.use_shared_expert and ".shared_expert." in name:
                p.zero_()
    return model.eval()


def ours_from_hf(cfg: ScoutConfig, hf) -> torch.nn.Module:
    from scout_mm.model import ScoutForConditionalGeneration

    ours = ScoutForConditionalGeneration(cfg).eval()
    state = hf.state_dict()
    if cfg.vision is None:
        state = {"language_model." + k: v for k, v in state.items()}
    if not cfg.text.use_shared_expert:
        state = {k: v for k, v in state.items() if ".shared_expert." not in k}
    ours.load_state_dict(state, strict=True)
    return ours


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| — relative to the reference's scale, robust to near-zero entries."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


def replace(cfg: ScoutConfig, **text) -> ScoutConfig:
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))


# Triton reads TRITON_INTERPRET when it is first imported, so interpreter tests run in a child pytest process
# of their own file (with the variable set), and the parent asserts that child passed.
INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"


def run_file_under_interpreter(path: str, **extra_env: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", **extra_env}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def interpreter_suite(path: str, **extra_env: str):
    """A file's ``test_interpreter_suite`` (assign it at module level under that name): in a plain run it runs the
    file ``path`` again under ``TRITON_INTERPRET=1`` (:func:`run_file_under_interpreter`) and asserts that child
    passed; in the child it is skipped."""
    import pytest

    @pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
    def test_interpreter_suite():
        pytest.importorskip("triton")
        run_file_under_interpreter(path, **extra_env)

    return test_interpreter_suite


def require_interpreter() -> None:
    """Skip the calling test or fixture outside the interpreter child that ``interpreter_suite`` starts."""
    import pytest

    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Module fixture: torch ops on one intra-op thread. GPTQ is thousands of small ops: with 2+ threads on a shared
    CPU, threads that wait for a busy core made those tests 20-100x slower (0.5 s -> 60 s); one thread is fast and
    steady. A module uses it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
