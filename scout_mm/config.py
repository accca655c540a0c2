"""Model configuration: dataclasses, named presets, and lossless conversion to/from HF ``config.json``.

Field names follow HF ``Llama4TextConfig`` / ``Llama4VisionConfig`` so that users can read one against the
other. Anything in an HF config that we do not model (``torch_dtype``, ``architectures``, ...) is kept in
``hf_extra`` and written back unchanged, so ``ScoutConfig.from_hf(d).to_hf() == d`` up to key order for the configs
transformers writes; a hand-written one comes back with HF's defaults for the keys it left out,
``text_config.tie_word_embeddings`` stated, and ``layer_types`` (transformers 5) derived from ``no_rope_layers``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

# Llama 4 special tokens keep their relative order in our small tokenizer: the first special token sits at
# ``SPECIAL_TOKEN_OFFSET`` (200000 in the real 202048-entry vocabulary) and e.g. <|patch|> is offset + 92.
LLAMA4_SPECIAL_OFFSET = 200_000
SMALL_VOCAB_SIZE = 8192
SMALL_SPECIAL_OFFSET = 7936  # 7936 BPE tokens, then 256 special tokens
BOS_REL, EOS_REL, EOM_REL, EOT_REL, PAD_REL = 0, 1, 7, 8, 18
BOI_REL, EOI_REL, IMAGE_REL = 80, 81, 92  # <|image_start|>, <|image_end|>, <|patch|>


@dataclass
class TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # per routed expert (and the shared expert)
    intermediate_size_mlp: int = 16384  # dense MLP layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 10485760
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 200018
    bos_token_id: int | None = 200000
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [200001, 200007, 200008])
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    rope_theta: float = 500000.0
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}; None = plain RoPE.
    rope_scaling: dict | None = None
    no_rope_layers: list[int] | None = None  # 1 = RoPE (chunked) layer, 0 = NoPE (global) layer
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool | int = True  # HF Scout's config.json stores the int 4 here
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    # Not an HF field: HF always builds a shared expert. When False we run without it and write zero
    # weights for it in HF checkpoints, which makes its output exactly zero there too.
    use_shared_expert: bool = True
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.no_rope_layers:  # None or [] (HF Scout's config.json): the default pattern, as in HF
            self.no_rope_layers = [
                int((i + 1) % self.no_rope_layer_interval != 0) for i in range(self.num_hidden_layers)
            ]
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
        self.validate()

    def validate(self) -> None:
        _check_positive_ints(self, _TEXT_SIZES, "")
        if self.attention_chunk_size is not None:
            _check_positive_ints(self, ("attention_chunk_size",), "", " (or null: no chunking)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ValueError(
                f"no_rope_layers has {len(self.no_rope_layers)} entries; expected at least "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok}; expected 1..{self.num_local_experts}"
            )
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for {self.num_hidden_layers} layers")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}; expected an even number (RoPE rotates pairs)")
        for key in _TEXT_FLAGS:
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r}; expected true or false")
        # HF Scout's config.json stores the int 4 here
        if not isinstance(self.attn_temperature_tuning, (bool, numbers.Integral)):
            raise ValueError(
                f"attn_temperature_tuning={self.attn_temperature_tuning!r}; expected true or false"
            )
        _check_numbers(self, {"rope_theta": "positive", "rms_norm_eps": "non-negative", "attn_scale": "any",
                              "attention_dropout": "probability", "router_aux_loss_coef": "non-negative"})  # fmt: skip
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is not None and (not is_int(token) or not 0 <= token < self.vocab_size):
                    raise ValueError(
                        f"{key}={value!r}; expected token ids in [0, vocab_size={self.vocab_size})"
                    )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; expected an object or null")
        if self.rope_scaling:
            kind = self.rope_scaling_kind
            if kind not in ("llama3", "default"):
                raise ValueError(f"rope_scaling type {kind!r}; expected 'llama3'")
            missing = [k for k in _ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if kind != "default" and missing:
                raise ValueError(
                    f"rope_scaling {self.rope_scaling} lacks {missing}, needed for llama3 scaling"
                )
            if kind == "llama3":
                scaling = self.rope_scaling
                _check_numbers(scaling, {"factor": "positive", "low_freq_factor": "positive",
                                         "high_freq_factor": "positive"}, "rope_scaling.")  # fmt: skip
                if scaling["high_freq_factor"] < scaling["low_freq_factor"]:
                    raise ValueError(
                        f"rope_scaling high_freq_factor={scaling['high_freq_factor']} is below "
                        f"low_freq_factor={scaling['low_freq_factor']}"
                    )
                old_len = scaling["original_max_position_embeddings"]
                if not is_int(old_len) or old_len <= 0:
                    raise ValueError(
                        f"rope_scaling original_max_position_embeddings={old_len!r}; expected a positive integer"
                    )

    @property
    def rope_scaling_kind(self) -> str:
        """``"default"`` (plain RoPE) or ``"llama3"``; older configs spell the key ``"type"`` (HF reads either),
        and a scaling dict without either key is llama3 (the only kind Llama 4 uses)."""
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "llama3"))

    def uses_rope(self, layer_idx: int) -> bool:
        """RoPE layers use chunked local attention and QK-norm; the others (NoPE) attend globally."""
        return bool(self.no_rope_layers[layer_idx])

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return (
            list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        )


@dataclass
class VisionConfig:
    hidden_size: int = 1408
    hidden_act: str = "gelu"
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5632
    vision_output_dim: int = 4096
    image_size: int = 336  # tile size in pixels
    patch_size: int = 14
    norm_eps: float = 1e-5
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int = -1
    initializer_range: float = 0.02
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    multi_modal_projector_bias: bool = False
    projector_dropout: float = 0.0
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_ints(self, _VISION_SIZES, "vision ")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size={self.hidden_size} not divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        grid = self.image_size // self.patch_size
        ratio = self.pixel_shuffle_ratio
        if (grid * ratio) != int(grid * ratio) or (1 / ratio) != int(1 / ratio):
            raise ValueError(f"pixel_shuffle_ratio={ratio} does not divide the {grid}x{grid} patch grid")
        shuffled = int(self.hidden_size / ratio**2)
        if shuffled != self.intermediate_size:
            # HF feeds the pixel-shuffled features into a Linear sized by intermediate_size.
            raise ValueError(
                f"vision intermediate_size={self.intermediate_size} must equal hidden_size/ratio^2={shuffled}"
            )
        if self.projector_output_dim != self.vision_output_dim:
            raise ValueError(
                f"projector_output_dim={self.projector_output_dim} must equal "
                f"vision_output_dim={self.vision_output_dim}"
            )

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one tile contributes after pixel shuffle."""
        grid = self.image_size // self.patch_size
        return int(grid * grid * self.pixel_shuffle_ratio**2)


@dataclass
class ScoutConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    boi_token_index: int = 200080
    eoi_token_index: int = 200081
    image_token_index: int = 200092
    tie_word_embeddings: bool = False
    hf_extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # One flag in effect: HF keeps it in text_config, the model reads this one; asking either ties.
        self.tie_word_embeddings = self.text.tie_word_embeddings = bool(
            self.tie_word_embeddings or self.text.tie_word_embeddings
        )
        if self.vision is not None:  # a text-only model has no image tokens (its ids are HF's defaults)
            for key in ("boi_token_index", "eoi_token_index", "image_token_index"):
                value = getattr(self, key)
                if not is_int(value) or not 0 <= value < self.text.vocab_size:
                    raise ValueError(
                        f"{key}={value!r} is not a token id of the vocabulary (vocab_size={self.text.vocab_size})"
                    )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **text_overrides) -> ScoutConfig:
        """Named presets: ``tiny``, ``small``, ``scout-17b-16e``. Keyword args override text fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name](**text_overrides)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> ScoutConfig:
        """Build from an HF Llama 4 ``config.json`` (path to the file or its folder, or the parsed dict).

        Accepts ``Llama4ForConditionalGeneration`` configs (``model_type: llama4``) and text-only
        ``Llama4ForCausalLM`` configs (``model_type: llama4_text``), in the legacy
        (``rope_theta``/``rope_scaling``) and the transformers-5 (``rope_parameters``) spellings.
        """
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path}")
            source = read_json_object(path)
        for key in ("text_config", "vision_config"):
            if not isinstance(source.get(key, {}), (dict, type(None))):
                raise ValueError(f"config {key} is a {type(source[key]).__name__}; expected an object")
        d = copy.deepcopy(source)
        model_type = d.get("model_type")
        if model_type == "llama4_text" or ("text_config" not in d and model_type != "llama4"):
            if model_type not in (None, "llama4_text"):
                raise ValueError(f"model_type={model_type!r}; expected 'llama4' or 'llama4_text'")
            text = _text_from_hf(d)
            return cls(text=text, vision=None, tie_word_embeddings=text.tie_word_embeddings, hf_extra={})
        if model_type != "llama4":
            raise ValueError(f"model_type={model_type!r}; expected 'llama4' or 'llama4_text'")
        text = _text_from_hf(d.pop("text_config", None) or {})
        vision_dict = d.pop("vision_config", None)
        if vision_dict is None:
            # HF builds its default vision tower for such a config, which a checkpoint rarely holds; reading it as
            # text-only here would silently disagree with HF (and write it back as llama4_text).
            raise ValueError(
                "config has model_type 'llama4' but no vision_config (HF would build its default vision tower): "
                "give the vision_config, or use model_type 'llama4_text' for a text-only model"
            )
        vision = _vision_from_hf(vision_dict)
        known = {"boi_token_index", "eoi_token_index", "image_token_index"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        d.pop("model_type")
        # HF ties the LM head by text_config.tie_word_embeddings (the text model ties its own weights); a
        # top-level value that disagrees has no effect there, and is only kept to be written back.
        if d.get("tie_word_embeddings", text.tie_word_embeddings) == text.tie_word_embeddings:
            d.pop("tie_word_embeddings", None)
        return cls(
            text=text, vision=vision, tie_word_embeddings=text.tie_word_embeddings, hf_extra=d, **kwargs
        )

    def to_hf(self) -> dict:
        """The HF ``config.json`` dict (``llama4`` with vision, ``llama4_text`` without)."""
        text = _text_to_hf(self.text)
        text["tie_word_embeddings"] = self.tie_word_embeddings  # what the model does; HF reads it here
        if self.vision is None:
            return text
        out = {
            "model_type": "llama4",
            "text_config": text,
            "vision_config": _vision_to_hf(self.vision),
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
            "image_token_index": self.image_token_index,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        out.setdefault("architectures", ["Llama4ForConditionalGeneration"])
        for k, v in self.hf_extra.items():
            out[k] = copy.deepcopy(v)
        return out

    def to_hf_file(self, dtype=None) -> dict:
        """The config.json dict to write (beside weights of ``dtype``, a torch dtype or its name, when given):
        :meth:`to_hf` with the dtype stated under both names (transformers 5 reads ``dtype`` first, so a stale
        one from a loaded config would win), ``attn_temperature_tuning`` as the bool that transformers 5
        requires (HF Scout's file stores the int 4), and a text-only model named ``Llama4ForCausalLM``."""
        hf = self.to_hf()
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            hf["torch_dtype"] = hf["dtype"] = name
            for sub in (hf.get("text_config"), hf.get("vision_config")):
                for key in ("torch_dtype", "dtype"):
                    if isinstance(sub, dict) and key in sub:
                        sub[key] = name
        text = hf.get("text_config", hf)
        text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
        if self.vision is None:
            hf["architectures"] = ["Llama4ForCausalLM"]
        return hf

    def save(self, directory: str | os.PathLike, dtype=None) -> None:
        """Write ``directory``/config.json (:meth:`to_hf_file`) with :func:`write_text_atomically`, so an
        interrupted save never leaves a half-written file."""
        text = json.dumps(self.to_hf_file(dtype), indent=2, sort_keys=True)
        write_text_atomically(os.path.join(os.fspath(directory), "config.json"), text)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError, label: str = "") -> dict:
    """The JSON object in the file ``path``; ``error``, naming ``label`` and the path, when the file is not valid
    JSON (or not UTF-8) or holds another JSON value than an object."""
    name = f"{label}{os.fspath(path)}"
    with open(path) as f:
        try:
            value = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise error(f"{name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise error(f"{name} holds a JSON {type(value).__name__}; expected an object")
    return value


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, flushed to disk, then rename it over ``path``: readers
    see the old file or the whole new one, never a part. On any error the temporary file goes and ``path`` is
    unchanged."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# HF text-config keys that map 1:1 onto TextConfig fields.
_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)} - {"hf_extra", "rope_theta", "rope_scaling"}
_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"hf_extra", "rope_theta"}


def is_int(value) -> bool:
    """An integer (Python or numpy), not a bool: what options that count things accept."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Sizes and counts that must be positive integers: a 0, a negative, a float or a string would otherwise fail
# later inside torch (or divide by zero) with a message that does not name the config key.
_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
               "interleave_moe_layer_step", "no_rope_layer_interval", "floor_scale", "max_position_embeddings")  # fmt: skip
_VISION_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "intermediate_size",
                 "vision_output_dim", "image_size", "patch_size", "projector_input_dim", "projector_output_dim")  # fmt: skip


def _check_positive_ints(config, keys, prefix: str, also: str = "") -> None:
    for key in keys:
        value = getattr(config, key)
        if not is_int(value) or value <= 0:
            raise ValueError(f"{prefix}{key}={value!r}; expected a positive integer{also}")


# Flags HF types as bool: a string such as "false" would be truthy here.
_TEXT_FLAGS = ("use_qk_norm", "attention_bias", "tie_word_embeddings", "use_shared_expert", "use_cache",
               "output_router_logits")  # fmt: skip
_NUMBER_RULES = {
    "positive": (lambda v: v > 0, "a positive number"),
    "non-negative": (lambda v: v >= 0, "a number >= 0"),
    "probability": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "any": (lambda v: v == v, "a number"),  # not NaN
}


def _check_numbers(source, rules: dict[str, str], prefix: str = "") -> None:
    """Each key of ``rules`` (an attribute of ``source``, or a key when it is a dict) must be a real number
    (not a bool or a string) that passes its rule."""
    for key, rule in rules.items():
        value = source[key] if isinstance(source, dict) else getattr(source, key)
        ok, expected = _NUMBER_RULES[rule]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
            raise ValueError(f"{prefix}{key}={value!r}; expected {expected}")


_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# Where our dataclass defaults (Scout's values) differ from HF's: a key absent from config.json means HF's.
_HF_TEXT_DEFAULTS = {
    "max_position_embeddings": 4096 * 32,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "vision_output_dim": 7680, "image_size": 448}


def _text_from_hf(d: dict) -> TextConfig:
    d = copy.deepcopy(d)
    d.pop("model_type", None)
    kwargs = {**_HF_TEXT_DEFAULTS, **{k: d.pop(k) for k in list(d) if k in _TEXT_FIELDS}}
    if "num_key_value_heads" in kwargs and kwargs["num_key_value_heads"] is None:  # HF's meaning: no GQA
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
    if "head_dim" in kwargs and kwargs["head_dim"] is None:  # HF's meaning: hidden size / attention heads
        heads = kwargs.get("num_attention_heads", TextConfig.num_attention_heads)
        hidden = kwargs.get("hidden_size", TextConfig.hidden_size)
        if is_int(heads) and is_int(hidden) and heads > 0:  # else validate() names the bad one
            kwargs["head_dim"] = hidden // heads
    # Either the legacy pair (rope_theta, rope_scaling) or transformers-5 rope_parameters; remember which.
    rope_parameters = d.pop("rope_parameters", None)
    rope_theta = d.pop("rope_theta", None)
    rope_scaling = d.pop("rope_scaling", None)
    if rope_parameters is not None:
        rope_theta = rope_parameters.get("rope_theta", rope_theta)
        if rope_parameters.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        d["_rope_style"] = "rope_parameters"
    if rope_theta is not None:
        kwargs["rope_theta"] = rope_theta
    kwargs["rope_scaling"] = rope_scaling
    text = TextConfig(**kwargs, hf_extra=d)
    layer_types = d.get("layer_types")  # kept in hf_extra for the round trip; must agree with no_rope_layers
    if layer_types is not None:
        derived = _layer_types(text, len(text.no_rope_layers))
        if list(layer_types) != derived[: len(layer_types)]:
            raise ValueError(
                f"layer_types {layer_types} disagree with no_rope_layers {text.no_rope_layers}: RoPE layers "
                "must use chunked attention and NoPE layers full attention"
            )
    return text


def _text_to_hf(t: TextConfig) -> dict:
    out = {k: copy.deepcopy(getattr(t, k)) for k in sorted(_TEXT_FIELDS)}
    out["model_type"] = "llama4_text"
    extra = copy.deepcopy(t.hf_extra)
    style = extra.pop("_rope_style", "legacy")
    if style == "rope_parameters":
        params = {"rope_theta": t.rope_theta}
        params.update(t.rope_scaling or {"rope_type": "default"})
        out["rope_parameters"] = params
    else:
        out["rope_theta"] = t.rope_theta
        out["rope_scaling"] = copy.deepcopy(t.rope_scaling)
    out.update(extra)
    if "layer_types" in out:  # derived from no_rope_layers, which may have changed since it was read
        out["layer_types"] = _layer_types(t, t.num_hidden_layers)
    return out


def _layer_types(t: TextConfig, n_layers: int) -> list[str]:
    """transformers 5's per-layer attention kinds: RoPE layers are chunked, NoPE layers full."""
    return ["chunked_attention" if r else "full_attention" for r in t.no_rope_layers[:n_layers]]


def _vision_from_hf(d: dict) -> VisionConfig:
    d = copy.deepcopy(d)
    d.pop("model_type", None)
    kwargs = {**_HF_VISION_DEFAULTS, **{k: d.pop(k) for k in list(d) if k in _VISION_FIELDS}}
    rope_parameters = d.pop("rope_parameters", None)
    if rope_parameters is not None:
        kwargs["rope_theta"] = rope_parameters.get("rope_theta", 10000.0)
        d["_rope_style"] = "rope_parameters"
    elif "rope_theta" in d:
        kwargs["rope_theta"] = d.pop("rope_theta")
    return VisionConfig(**kwargs, hf_extra=d)


def _vision_to_hf(v: VisionConfig) -> dict:
    out = {k: copy.deepcopy(getattr(v, k)) for k in sorted(_VISION_FIELDS)}
    out["model_type"] = "llama4_vision_model"
    extra = copy.deepcopy(v.hf_extra)
    if extra.pop("_rope_style", "legacy") == "rope_parameters":
        out["rope_parameters"] = {"rope_theta": v.rope_theta, "rope_type": "default"}
    else:
        out["rope_theta"] = v.rope_theta
    out.update(extra)
    return out


# ---------------------------------------------------------------------- presets
def _small_vocab_text(**kw) -> TextConfig:
    """Text config for presets that use the package's own 8192-entry tokenizer."""
    o = SMALL_SPECIAL_OFFSET
    ids = dict(
        vocab_size=SMALL_VOCAB_SIZE,
        bos_token_id=o + BOS_REL,
        eos_token_id=[o + EOS_REL, o + EOM_REL, o + EOT_REL],
        pad_token_id=o + PAD_REL,
    )
    return TextConfig(**{**ids, **kw})


def _small_vocab_scout(text: TextConfig, vision: VisionConfig) -> ScoutConfig:
    o = SMALL_SPECIAL_OFFSET
    return ScoutConfig(
        text=text,
        vision=vision,
        boi_token_index=o + BOI_REL,
        eoi_token_index=o + EOI_REL,
        image_token_index=o + IMAGE_REL,
    )


def _tiny(**overrides) -> ScoutConfig:
    base = dict(
        hidden_size=256,
        intermediate_size=128,
        intermediate_size_mlp=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        num_local_experts=16,
        num_experts_per_tok=2,
        use_shared_expert=False,
        attention_chunk_size=128,
        floor_scale=128,
        router_aux_loss_coef=0.01,
    )
    text = _small_vocab_text(**{**base, **overrides})
    vision = VisionConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=168,
        patch_size=14,
        vision_output_dim=256,
        projector_input_dim=256,
        projector_output_dim=256,
    )
    return _small_vocab_scout(text, vision)


def _small(**overrides) -> ScoutConfig:
    base = dict(
        hidden_size=1024,
        intermediate_size=1024,
        intermediate_size_mlp=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=131072,
        num_local_experts=16,
        num_experts_per_tok=2,
        use_shared_expert=False,
        attention_chunk_size=2048,
        floor_scale=2048,
        router_aux_loss_coef=0.01,
    )
    text = _small_vocab_text(**{**base, **overrides})
    vision = VisionConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        intermediate_size=2048,
        image_size=336,
        vision_output_dim=1024,
        projector_input_dim=1024,
        projector_output_dim=1024,
    )
    return _small_vocab_scout(text, vision)


def _scout_17b_16e(**overrides) -> ScoutConfig:
    """Exactly HF meta-llama/Llama-4-Scout-17B-16E."""
    scaling = {
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    return ScoutConfig(text=TextConfig(**{"rope_scaling": scaling, **overrides}), vision=VisionConfig())


PRESETS = {"tiny": _tiny, "small": _small, "scout-17b-16e": _scout_17b_16e}
