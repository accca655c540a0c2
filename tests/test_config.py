"""Presets, HF config.json conversion and parameter counting."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from scout_mm.config import ScoutConfig, TextConfig, VisionConfig
from scout_mm.model import count_parameters

# The layout of meta-llama/Llama-4-Scout-17B-16E's config.json (legacy rope spelling, HF-only keys).
SCOUT_HF_CONFIG = {
    "architectures": ["Llama4ForConditionalGeneration"],
    "boi_token_index": 200080,
    "eoi_token_index": 200081,
    "image_token_index": 200092,
    "model_type": "llama4",
    "text_config": {
        "_attn_implementation_autoset": True,
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attention_dropout": 0.0,
        "attn_scale": 0.1,
        "attn_temperature_tuning": 4,
        "bos_token_id": 200000,
        "cache_implementation": "hybrid",
        "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192,
        "for_llm_compressor": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 5120,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": 1,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760,
        "model_type": "llama4_text",
        "moe_layers": list(range(48)),
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "output_router_logits": False,
        "pad_token_id": 200018,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 16.0,
            "high_freq_factor": 1.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_qk_norm": True,
        "vocab_size": 202048,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0.dev0",
    "vision_config": {
        "_attn_implementation_autoset": True,
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1408,
        "image_size": 336,
        "initializer_range": 0.02,
        "intermediate_size": 5632,
        "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False,
        "norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 34,
        "patch_size": 14,
        "pixel_shuffle_ratio": 0.5,
        "projector_dropout": 0.0,
        "projector_input_dim": 4096,
        "projector_output_dim": 4096,
        "rope_theta": 10000,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "vision_output_dim": 4096,
    },
}


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_scout_hf_config_round_trips_losslessly():
    cfg = ScoutConfig.from_hf(copy.deepcopy(SCOUT_HF_CONFIG))
    out = cfg.to_hf()
    # Everything HF had comes back with the same value; the only additions are fields the input left at
    # their defaults, and our use_shared_expert.
    text_in, text_out = SCOUT_HF_CONFIG["text_config"], out["text_config"]
    assert {k: text_out[k] for k in text_in} == text_in
    assert set(text_out) - set(text_in) == {
        "use_shared_expert",
        "no_rope_layer_interval",
        "tie_word_embeddings",
    }
    assert out["vision_config"] == SCOUT_HF_CONFIG["vision_config"]
    assert _without(out, "text_config", "vision_config") == _without(
        SCOUT_HF_CONFIG, "text_config", "vision_config"
    )
    assert json.loads(json.dumps(out)) == out  # JSON-serialisable


def test_scout_preset_is_exactly_the_hf_model():
    preset = ScoutConfig.from_preset("scout-17b-16e")
    hf = ScoutConfig.from_hf(copy.deepcopy(SCOUT_HF_CONFIG))
    fields = [f for f in TextConfig.__dataclass_fields__ if f not in ("hf_extra", "attn_temperature_tuning")]
    for f in fields:
        assert getattr(preset.text, f) == getattr(hf.text, f), f
    assert bool(preset.text.attn_temperature_tuning) == bool(hf.text.attn_temperature_tuning)
    for f in VisionConfig.__dataclass_fields__:
        if f != "hf_extra":
            assert getattr(preset.vision, f) == getattr(hf.vision, f), f
    assert (preset.boi_token_index, preset.eoi_token_index, preset.image_token_index) == (
        200080,
        200081,
        200092,
    )


def test_transformers_v5_config_dict_round_trips():
    from transformers import Llama4Config

    for name in ("tiny", "scout-17b-16e"):
        hf_dict = Llama4Config(**ScoutConfig.from_preset(name).to_hf()).to_dict()
        cfg = ScoutConfig.from_hf(copy.deepcopy(hf_dict))
        assert cfg.to_hf() == hf_dict
        assert cfg.text == ScoutConfig.from_preset(name).text.__class__(
            **{**ScoutConfig.from_preset(name).text.__dict__, "hf_extra": cfg.text.hf_extra}
        )


def test_text_only_config_from_causal_lm():
    text = copy.deepcopy(SCOUT_HF_CONFIG["text_config"])
    cfg = ScoutConfig.from_hf(text)
    assert cfg.vision is None
    assert cfg.text.num_hidden_layers == 48
    out = cfg.to_hf()
    assert {k: out[k] for k in text} == text


def test_config_file_path(tmp_path):
    ScoutConfig.from_preset("tiny").save(tmp_path)
    assert ScoutConfig.from_hf(tmp_path).text == ScoutConfig.from_hf(tmp_path / "config.json").text
    assert os.listdir(tmp_path) == ["config.json"]  # written under a temporary name, then renamed


def test_saved_config_is_what_transformers_reads(tmp_path):
    """ScoutConfig.save writes what checkpoints write: the dtype under both names, attn_temperature_tuning as a
    bool (HF Scout's own file has the int 4, which transformers 5 rejects), and transformers loads it."""
    from transformers import AutoConfig

    hf = copy.deepcopy(SCOUT_HF_CONFIG)
    hf["text_config"]["attn_temperature_tuning"] = 4
    ScoutConfig.from_hf(hf).save(tmp_path, dtype=torch.float16)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "float16"
    assert saved["text_config"]["attn_temperature_tuning"] is True
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.text_config.attn_temperature_tuning is True
    # the same model; only the stated dtype (in hf_extra) and the bool's spelling changed
    reloaded, original = ScoutConfig.from_hf(tmp_path).text, ScoutConfig.from_hf(hf).text
    assert reloaded.attn_temperature_tuning is True and reloaded.hf_extra["torch_dtype"] == "float16"
    same = dict(attn_temperature_tuning=4, hf_extra={})
    assert dataclasses.replace(reloaded, **same) == dataclasses.replace(original, hf_extra={})
    text_only = ScoutConfig.from_hf(hf["text_config"])
    text_only.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"model_type": "llama"}, "model_type='llama'"),
        (
            {"model_type": "llama4", "text_config": {"num_attention_heads": 6, "num_key_value_heads": 4}},
            "multiple",
        ),
    ],
)
def test_bad_hf_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        ScoutConfig.from_hf(bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*scout-17b-16e.*small.*tiny"):
        ScoutConfig.from_preset("huge")


def test_invalid_values_are_rejected():
    with pytest.raises(ValueError, match="num_experts_per_tok=3"):
        TextConfig(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=100, patch_size=14)
    with pytest.raises(ValueError, match="intermediate_size"):
        VisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=100)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            {"num_key_value_heads": 0},
            "num_key_value_heads=0; expected a positive integer",
        ),  # was ZeroDivisionError
        ({"hidden_size": -64}, "hidden_size=-64; expected a positive integer"),  # was a torch error on build
        ({"vocab_size": "320"}, "vocab_size='320'; expected a positive integer"),
        ({"num_attention_heads": 4.0}, "num_attention_heads=4.0; expected a positive integer"),
        ({"attention_chunk_size": 0}, r"attention_chunk_size=0; expected a positive integer \(or null"),
        ({"head_dim": True}, "head_dim=True; expected a positive integer"),
        # accepted before, then wrong or a crash far from the cause
        ({"use_qk_norm": "false"}, "use_qk_norm='false'; expected true or false"),  # a truthy string
        ({"attn_temperature_tuning": "no"}, "attn_temperature_tuning='no'; expected true or false"),
        ({"rope_theta": 0}, "rope_theta=0; expected a positive number"),
        ({"rope_theta": "5e5"}, "rope_theta='5e5'; expected a positive number"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0; expected a number >= 0"),
        ({"head_dim": 15}, "head_dim=15; expected an even number"),
        ({"pad_token_id": 10**6}, r"pad_token_id=1000000; expected token ids in \[0, vocab_size"),
        ({"eos_token_id": [1, -1]}, r"eos_token_id=\[1, -1\]; expected token ids"),
        ({"attention_dropout": 1.5}, r"attention_dropout=1.5; expected a number in \[0, 1\)"),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 0.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "rope_scaling.factor=0.0; expected a positive",
        ),
        (
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                }
            },
            "high_freq_factor=1.0 is below",
        ),
    ],
)
def test_sizes_and_counts_must_be_positive_integers(edit, match):
    hf = ScoutConfig.from_preset("tiny").to_hf()
    hf["text_config"].update(edit)
    with pytest.raises(ValueError, match=match):
        ScoutConfig.from_hf(hf)
    hf = ScoutConfig.from_preset("tiny").to_hf()
    hf["vision_config"]["patch_size"] = 0  # was ZeroDivisionError
    with pytest.raises(ValueError, match="vision patch_size=0; expected a positive integer"):
        ScoutConfig.from_hf(hf)


def test_head_dim_null_means_hidden_size_over_heads_as_in_hf():
    # Was a TypeError in the model. transformers' Llama4TextConfig resolves a None head_dim to this in its
    # __post_init__ (4.x configs can hold a null; 5.x refuses it before that), so that is the meaning to take.
    hf = ScoutConfig.from_preset("tiny").to_hf()
    hf["text_config"]["head_dim"] = None
    text = hf["text_config"]
    assert ScoutConfig.from_hf(hf).text.head_dim == text["hidden_size"] // text["num_attention_heads"] != 128


def test_null_kv_heads_means_no_grouping_as_in_hf():
    hf = ScoutConfig.from_preset("tiny").to_hf()
    hf["text_config"]["num_key_value_heads"] = None
    text = ScoutConfig.from_hf(hf).text
    assert text.num_key_value_heads == text.num_attention_heads


def test_llama4_config_without_vision_config_is_refused():
    # HF builds its default vision tower for it; reading it as text-only disagreed with HF silently.
    hf = ScoutConfig.from_preset("tiny").to_hf()
    for value in (None, "absent"):
        if value is None:
            hf["vision_config"] = None
        else:
            hf.pop("vision_config")
        with pytest.raises(ValueError, match="model_type 'llama4' but no vision_config"):
            ScoutConfig.from_hf(hf)


def test_legacy_rope_type_key_is_read_by_the_model():
    """{"type": "default"} passed validation, then the model read it as llama3 and failed (KeyError 'factor')."""
    import torch

    from scout_mm.model import rope_inv_freq

    plain = TextConfig(rope_scaling=None)
    for scaling in ({"type": "default"}, {"rope_type": "default"}):
        assert torch.equal(rope_inv_freq(TextConfig(rope_scaling=scaling)), rope_inv_freq(plain))
    llama3 = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    by_type = rope_inv_freq(TextConfig(rope_scaling={"type": "llama3", **llama3}))
    assert torch.equal(by_type, rope_inv_freq(TextConfig(rope_scaling={"rope_type": "llama3", **llama3})))
    assert not torch.equal(by_type, rope_inv_freq(plain))


def test_image_token_ids_must_be_in_the_vocabulary():
    hf = ScoutConfig.from_preset("tiny").to_hf()
    hf["image_token_index"] = hf["text_config"]["vocab_size"]  # was accepted; an embedding IndexError later
    with pytest.raises(ValueError, match=r"image_token_index=\d+ is not a token id of the vocabulary"):
        ScoutConfig.from_hf(hf)
    # A text-only config keeps HF's default ids whatever its vocabulary: it has no image tokens.
    assert ScoutConfig.from_hf({"model_type": "llama4_text", "vocab_size": 320, "num_hidden_layers": 2})


def test_presets():
    tiny = ScoutConfig.from_preset("tiny")
    assert (tiny.text.num_local_experts, tiny.text.num_experts_per_tok) == (16, 2)
    assert not all(tiny.text.no_rope_layers)  # iRoPE: at least one NoPE layer
    assert tiny.vision is not None
    small_total = count_parameters(ScoutConfig.from_preset("small"))["total"]
    assert 0.5e9 <= small_total <= 1.5e9
    assert count_parameters(tiny)["total"] < 15e6  # the embedded default ships in bf16 within ~30 MB


def test_scout_parameter_counts_on_meta_device():
    counts = count_parameters(ScoutConfig.from_preset("scout-17b-16e"))
    print({k: f"{v / 1e9:.3f}B" for k, v in counts.items()})
    assert abs(counts["total"] / 108.6e9 - 1) < 0.01
    assert abs(counts["active"] / 17.0e9 - 1) < 0.01


def test_overrides():
    cfg = ScoutConfig.from_preset("tiny", num_hidden_layers=8)
    assert cfg.text.num_hidden_layers == 8
    assert len(cfg.text.no_rope_layers) >= 8


def test_tie_word_embeddings_is_read_from_text_config_as_hf_does():
    # transformers ties the LM head by text_config.tie_word_embeddings; the top-level value has no effect.
    tiny = ScoutConfig.from_preset("tiny").to_hf()
    for top, text in [(True, False), (False, True)]:
        hf = copy.deepcopy(tiny)
        hf["tie_word_embeddings"], hf["text_config"]["tie_word_embeddings"] = top, text
        cfg = ScoutConfig.from_hf(copy.deepcopy(hf))
        assert cfg.tie_word_embeddings is text
        assert cfg.to_hf() == hf  # the inert top-level value is written back as it was
    # Built in Python with only the top-level flag set: the model ties, so the HF text config must say so.
    for vision in (True, False):
        cfg = ScoutConfig.from_preset("tiny")
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True, vision=cfg.vision if vision else None)
        out = cfg.to_hf()
        assert out.get("text_config", out)["tie_word_embeddings"] is True
        assert ScoutConfig.from_hf(out).tie_word_embeddings is True


def test_keys_missing_from_config_json_mean_hf_defaults():
    text = {"model_type": "llama4_text", "num_hidden_layers": 2, "vocab_size": 320}
    cfg = ScoutConfig.from_hf(text)
    assert (cfg.text.pad_token_id, cfg.text.bos_token_id, cfg.text.eos_token_id) == (None, 1, 2)
    assert cfg.text.max_position_embeddings == 131072
    vision = {k: v for k, v in SCOUT_HF_CONFIG["vision_config"].items() if k != "image_size"}
    cfg = ScoutConfig.from_hf({**SCOUT_HF_CONFIG, "vision_config": vision})
    assert cfg.vision.image_size == 448


@pytest.mark.parametrize(
    "scaling, match",
    [
        ({"type": "linear", "factor": 2.0}, "rope_scaling type 'linear'"),
        ({"rope_type": "llama3", "factor": 8.0}, "lacks.*low_freq_factor"),
    ],
)
def test_unusable_rope_scaling_is_rejected(scaling, match):
    with pytest.raises(ValueError, match=match):
        TextConfig(rope_scaling=scaling)


@pytest.mark.parametrize("content", ["[]", '"llama4"', '{"model_type": "llama4", "text_config": 3}'])
def test_config_json_that_is_not_an_object(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ValueError, match="expected an object"):
        ScoutConfig.from_hf(tmp_path)


def test_layer_types_follow_edited_layers():
    from transformers import Llama4Config

    hf5 = Llama4Config(**ScoutConfig.from_preset("tiny").to_hf()).to_dict()  # writes layer_types
    cfg = ScoutConfig.from_hf(hf5)
    cfg.text = dataclasses.replace(cfg.text, num_hidden_layers=2, no_rope_layers=[0, 1], moe_layers=[1])
    out = cfg.to_hf()["text_config"]
    assert out["layer_types"] == ["full_attention", "chunked_attention"]
    assert ScoutConfig.from_hf(cfg.to_hf()).text.no_rope_layers == [0, 1]


def test_hf_spellings_of_defaults_and_one_tie_flag():
    # HF Scout's config.json has "no_rope_layers": [] (HF: the default pattern) and older configs spell
    # rope_scaling's kind "type"; tie_word_embeddings asked for on the text config (e.g. by a preset override)
    # ties the model.
    text = TextConfig(num_hidden_layers=8, no_rope_layers=[], no_rope_layer_interval=4)
    assert text.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert TextConfig(rope_scaling={"type": "default"}).rope_scaling == {"type": "default"}
    with pytest.raises(ValueError, match="lacks"):
        TextConfig(rope_scaling={"type": "llama3", "factor": 8.0})
    tied = ScoutConfig.from_preset("tiny", tie_word_embeddings=True)
    assert tied.tie_word_embeddings and tied.text.tie_word_embeddings
    assert tied.to_hf()["text_config"]["tie_word_embeddings"] is True
    assert ScoutConfig.from_hf(tied.to_hf()).tie_word_embeddings


def test_published_scout_config_json_reads_as_the_preset():
    # The key values of Llama-4-Scout-17B-16E-Instruct's config.json (transformers 4.51 layout), including its
    # "no_rope_layers": [] and int attn_temperature_tuning, read as the scout-17b-16e preset's model.
    text = {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1,
        "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
        "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "interleave_moe_layer_step": 1, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "max_position_embeddings": 10485760, "no_rope_layers": [], "num_attention_heads": 40,
        "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
        "pad_token_id": 200018, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "use_qk_norm": True,
        "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16", "vocab_size": 202048,
    }  # fmt: skip
    vision = {
        "model_type": "llama4_vision_model", "hidden_act": "gelu", "hidden_size": 1408, "image_size": 336,
        "intermediate_size": 5632, "multi_modal_projector_bias": False, "norm_eps": 1e-05,
        "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14,
        "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096, "rope_theta": 10000,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default", "vision_output_dim": 4096,
    }  # fmt: skip
    hf = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
          "eoi_token_index": 200081, "image_token_index": 200092, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16", "text_config": text, "vision_config": vision}  # fmt: skip
    config = ScoutConfig.from_hf(hf)
    preset = ScoutConfig.from_preset("scout-17b-16e")
    assert config.text.no_rope_layers == [1, 1, 1, 0] * 12 == preset.text.no_rope_layers
    assert count_parameters(config) == count_parameters(preset)
    for name in ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "moe_layers",
                 "attention_chunk_size", "rope_scaling", "use_qk_norm", "vocab_size"):  # fmt: skip
        assert getattr(config.text, name) == getattr(preset.text, name), name
    assert not config.tie_word_embeddings
    again = ScoutConfig.from_hf(config.to_hf())
    assert again.text == config.text and again.vision == config.vision
