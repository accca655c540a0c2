"""Vision tower vs HF ``Llama4VisionModel`` / ``Llama4MultiModalProjector`` on small random configs."""

import random
from types import SimpleNamespace

import pytest
import torch
import transformers
import transformers.models.llama4.modeling_llama4 as hf_llama4

from scout_mm.config import VisionConfig
from scout_mm.vision.encoder import VisionEncoder, VisionProjector, pixel_shuffle
from scout_mm.vision.rope import rope_angles

CONFIGS = {
    "h64_s56": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=56, out=32),
    "h96_s84": dict(hidden_size=96, num_attention_heads=4, num_hidden_layers=3, image_size=84, out=48),
    "h64_s168": dict(
        hidden_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=168, out=40, theta=500.0
    ),
}
PARITY_RTOL = 1e-5


def make_cfg(
    hidden_size, num_attention_heads, num_hidden_layers, image_size, out, theta=10000.0
) -> VisionConfig:
    return VisionConfig(
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=hidden_size * 4,
        image_size=image_size,
        patch_size=14,
        vision_output_dim=out,
        projector_input_dim=out,
        projector_output_dim=out,
        rope_theta=theta,
    )


def make_hf(cfg: VisionConfig, seed: int) -> torch.nn.Module:
    hf_cfg = transformers.Llama4VisionConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_output_dim=cfg.vision_output_dim,
        projector_input_dim=cfg.projector_input_dim,
        projector_output_dim=cfg.projector_output_dim,
        pixel_shuffle_ratio=cfg.pixel_shuffle_ratio,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    hf_cfg._attn_implementation = "eager"
    model = hf_llama4.Llama4VisionModel(hf_cfg).eval()
    randomise(model, seed)
    return model


def randomise(model: torch.nn.Module, seed: int) -> None:
    # HF initialises biases to zero and LayerNorms to one: overwrite everything so each term is exercised.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "embedding" in name else 0.1
            param.copy_(
                torch.randn(param.shape, generator=gen) * scale + (1.0 if "layernorm" in name else 0.0)
            )


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def pixels(cfg: VisionConfig, n_tiles: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_tiles, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_matches_hf(name):
    cfg = make_cfg(**CONFIGS[name])
    seed = random.SystemRandom().randrange(2**31)  # fresh weights and inputs every run; printed on failure
    hf = make_hf(cfg, seed)
    ours = VisionEncoder(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixel_values = pixels(cfg, n_tiles=3, seed=seed + 1)
    with torch.no_grad():
        expected = hf(pixel_values).last_hidden_state
        got = ours(pixel_values)
    assert got.shape == (3, cfg.tokens_per_tile, cfg.vision_output_dim)
    assert expected.shape == got.shape
    err = rel_err(got, expected)
    print(f"{name}: max rel err {err:.2e} (seed {seed})")
    assert err <= PARITY_RTOL, f"max rel err {err:.2e} > {PARITY_RTOL} (seed {seed})"


def test_state_dict_keys_match_hf():
    cfg = make_cfg(**CONFIGS["h96_s84"])
    hf_keys = set(make_hf(cfg, 0).state_dict())
    ours = VisionEncoder(cfg)
    assert set(ours.state_dict()) == hf_keys
    assert not any("rotary" in k or "freqs" in k for k in ours.state_dict())
    assert {"patch_embedding.linear.weight", "vision_adapter.mlp.fc2.weight", "class_embedding"} <= hf_keys
    for key, tensor in make_hf(cfg, 0).state_dict().items():
        assert ours.state_dict()[key].shape == tensor.shape, key


def test_rope_angles_match_hf_table():
    for spec in CONFIGS.values():
        cfg = make_cfg(**spec)
        hf_table = make_hf(cfg, 0).rotary_embedding.freqs_ci.squeeze(
            1
        )  # (n_patches + 1, head_dim // 2) complex
        angles = rope_angles(cfg)
        assert torch.equal(angles.cos(), hf_table.real)
        assert torch.equal(angles.sin(), hf_table.imag)


def test_pixel_shuffle_matches_hf():
    x = torch.randn(2, 12 * 12, 8)
    assert torch.equal(pixel_shuffle(x, 0.5), hf_llama4.pixel_shuffle(x, 0.5))


def test_projector_matches_hf():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    text_hidden = 80
    hf_cfg = SimpleNamespace(vision_config=cfg, text_config=SimpleNamespace(hidden_size=text_hidden))
    hf = hf_llama4.Llama4MultiModalProjector(hf_cfg)
    with torch.no_grad():
        hf.linear_1.weight.normal_()
    ours = VisionProjector(text_hidden, cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    features = torch.randn(3, cfg.tokens_per_tile, cfg.vision_output_dim)
    with torch.no_grad():
        err = rel_err(ours(features), hf(features))
    print(f"projector: max rel err {err:.2e}")
    assert err <= PARITY_RTOL


def test_meta_build_then_load():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    reference = VisionEncoder(cfg).eval()
    with torch.device("meta"):
        ours = VisionEncoder(cfg)
    ours.to_empty(device="cpu")
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()
    pixel_values = pixels(cfg, n_tiles=2, seed=0)
    with torch.no_grad():
        assert torch.equal(ours(pixel_values), reference(pixel_values))


def test_meta_build_then_init_weights():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    with torch.device("meta"):
        ours = VisionEncoder(cfg)
    ours.to_empty(device="cpu")
    ours.init_weights()
    with torch.no_grad():
        out = ours(pixels(cfg, n_tiles=1, seed=0))
    assert torch.isfinite(out).all()
    ln = ours.model.layers[0].input_layernorm
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(
        ln.bias, torch.zeros_like(ln.bias)
    )


def test_bf16_weights_take_fp32_pixels():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    ours = VisionEncoder(cfg).eval()
    pixel_values = pixels(cfg, n_tiles=2, seed=0)
    with torch.no_grad():
        full = ours(pixel_values)
        half = ours.to(torch.bfloat16)(pixel_values)
    assert half.dtype == torch.bfloat16
    assert half.shape == full.shape
    assert rel_err(half, full) < 5e-2


def test_gradient_checkpointing_same_grads():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    ours = VisionEncoder(cfg).train()
    pixel_values = pixels(cfg, n_tiles=2, seed=0)

    def grads():
        ours.zero_grad()
        ours(pixel_values).square().sum().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.model.gradient_checkpointing = True
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_wrong_tile_size_is_rejected():
    cfg = make_cfg(**CONFIGS["h64_s56"])
    with pytest.raises(ValueError, match="expected"):
        VisionEncoder(cfg)(torch.zeros(1, 3, 42, 42))


def test_integer_pixel_values_are_rejected():
    """Raw 0..255 tiles cast as they are would be read as normalised values: a silent wrong answer."""
    cfg = make_cfg(**CONFIGS["h64_s56"])
    encoder = VisionEncoder(cfg)
    with pytest.raises(TypeError, match="pixel_values dtype torch.uint8; expected floating point"):
        encoder(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(
        ValueError, match=r"pixel_values shape \(3, 56, 56\); expected \(n_tiles, 3, 56, 56\)"
    ):
        encoder(torch.zeros(3, 56, 56))
