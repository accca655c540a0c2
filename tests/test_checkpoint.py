"""Checkpoint round trips with HF transformers, sharding, and clear errors for bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from scout_mm.checkpoint import CheckpointError
from scout_mm.model import ScoutForConditionalGeneration
from tests.helpers import hf_model, max_rel_err, tiny_config

TOL = 1e-5


def _inputs(cfg, with_image):
    ids = torch.randint(3, cfg.image_token_index - 5, (2, 21))
    if not with_image:
        return dict(input_ids=ids)
    n = cfg.vision.tokens_per_tile
    ids[0, 2 : 2 + n] = cfg.image_token_index
    size = cfg.vision.image_size
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size))


def _same_logits(a, b, inputs):
    with torch.no_grad():
        return max_rel_err(a(**inputs).logits, b(**inputs).logits)


@pytest.mark.parametrize("vision", [True, False], ids=["conditional_generation", "causal_lm"])
@pytest.mark.parametrize("shard", ["5GB", "40KB"], ids=["single_file", "sharded"])
def test_hf_save_then_our_load(tmp_path, vision, shard):
    cfg = tiny_config(vision=vision)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path, max_shard_size=shard)
    if shard == "40KB":
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = ScoutForConditionalGeneration.from_pretrained(tmp_path)
    assert _same_logits(ours, hf, _inputs(cfg, vision)) < TOL


@pytest.mark.parametrize("vision", [True, False], ids=["conditional_generation", "causal_lm"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_expert", "no_shared_expert"])
def test_our_save_then_hf_load(tmp_path, vision, shared):
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

    cfg = tiny_config(vision=vision, use_shared_expert=shared, num_experts_per_tok=1 if shared else 2)
    ours = ScoutForConditionalGeneration(cfg).eval()
    ours.save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temp folder renamed away
    hf_cls = Llama4ForConditionalGeneration if vision else Llama4ForCausalLM
    hf = hf_cls.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").float().eval()
    assert _same_logits(ours, hf, _inputs(cfg, vision)) < TOL
    again = ScoutForConditionalGeneration.from_pretrained(tmp_path / "ckpt")
    assert dataclasses.replace(again.config.text, hf_extra={}) == dataclasses.replace(
        ours.config.text, hf_extra={}
    )
    assert _same_logits(ours, again, _inputs(cfg, vision)) == 0.0


def test_load_with_dtype(tmp_path):
    cfg = tiny_config(vision=True)
    ScoutForConditionalGeneration(cfg).save_pretrained(tmp_path / "m")
    model = ScoutForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        model(**_inputs(cfg, True))


def test_save_replaces_weights_but_keeps_other_files(tmp_path):
    cfg = tiny_config(vision=False)
    target = tmp_path / "m"
    ScoutForConditionalGeneration(cfg).save_pretrained(target, max_shard_size="30KB")
    (target / "tokenizer.json").write_text("{}")
    second = ScoutForConditionalGeneration(cfg).eval()
    second.save_pretrained(target)  # now one file: the old shards and index must go
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = ScoutForConditionalGeneration.from_pretrained(target)
    assert _same_logits(second, loaded, _inputs(cfg, False)) == 0.0


def test_save_into_a_run_folder_moves_what_it_keeps_and_restores_it_on_failure(tmp_path, monkeypatch):
    # A training run exports into its own folder: its checkpoints/ tree and open log must stay where they are.
    # Was: every kept file and folder copied into the new folder (a second copy of checkpoints/ on disk) and
    # the log's open handle left writing to the old copy, deleted after the rename.
    import scout_mm.checkpoint as ckpt

    cfg = tiny_config(vision=False)
    run = tmp_path / "run"
    (run / "checkpoints" / "step1").mkdir(parents=True)
    (run / "checkpoints" / "step1" / "state.pt").write_bytes(b"x" * 1000)
    inode = os.stat(run / "checkpoints" / "step1" / "state.pt").st_ino
    log = open(run / "metrics.jsonl", "a")
    log.write("first\n")
    ScoutForConditionalGeneration(cfg).save_pretrained(run)
    log.write("second\n")
    log.close()
    assert (run / "metrics.jsonl").read_text() == "first\nsecond\n"
    assert os.stat(run / "checkpoints" / "step1" / "state.pt").st_ino == inode  # moved, not copied
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "metrics.jsonl", "model.safetensors"]
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    renames, rename = [], os.rename

    def rename_fails_at_the_swap(a, b):  # the kept entries move, then the new folder cannot take the old name
        renames.append((a, b))
        if os.path.basename(a).startswith("run.tmp-") and b == str(run):
            raise OSError("rename failed")
        rename(a, b)

    monkeypatch.setattr(ckpt.os, "rename", rename_fails_at_the_swap)
    with pytest.raises(OSError, match="rename failed"):
        ScoutForConditionalGeneration(cfg).save_pretrained(run)
    monkeypatch.undo()
    assert len(renames) > 3  # the moves out, the backup, the failed swap, and the moves back happened
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary or backup folder left


def test_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    import scout_mm.checkpoint as ckpt

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ScoutForConditionalGeneration(tiny_config(vision=False)).save_pretrained(tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def saved(tmp_path):
    cfg = tiny_config(vision=False)
    ScoutForConditionalGeneration(cfg).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_folder_or_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ScoutForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*nope does not exist"):
        ScoutForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_a_file_given_for_the_folder_names_the_folder(saved):
    # Was: NotADirectoryError '.../config.json/config.json', and "model.safetensors is not valid JSON".
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(
            NotADirectoryError, match=f"{name} is a file; pass the checkpoint folder \\({saved}\\)"
        ):
            ScoutForConditionalGeneration.from_pretrained(saved / name)


def test_missing_weights(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_corrupt_file(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    state = load_file(saved / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    state[key] = torch.zeros(3, 5)
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\(3, 5\).*\(64, 64\)"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_missing_and_unexpected_tensors(saved):
    state = load_file(saved / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing.*model.norm.weight"):
        ScoutForConditionalGeneration.from_pretrained(saved)
    state["model.norm.weight"] = torch.ones(64)
    state["model.layers.9.mlp.weight"] = torch.ones(2)
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.9.mlp.weight"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_config_mismatch_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    config["num_local_experts"] = 8
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="experts"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_index_naming_missing_shard(tmp_path):
    ScoutForConditionalGeneration(tiny_config(vision=False)).save_pretrained(
        tmp_path / "m", max_shard_size="40KB"
    )
    shards = sorted(p for p in os.listdir(tmp_path / "m") if p.startswith("model-"))
    os.remove(tmp_path / "m" / shards[-1])
    with pytest.raises(CheckpointError, match="missing"):
        ScoutForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_pickle_only_checkpoint_is_refused(saved):
    os.remove(saved / "model.safetensors")
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_invalid_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ScoutForConditionalGeneration.from_pretrained(saved)


# ---------------------------------------------------------------------------------------- memory
def test_peak_host_memory_is_about_one_copy(tmp_path):
    """Loading a ~200 MB sharded checkpoint raises peak RSS by well under two copies of the weights."""
    cfg = tiny_config(vision=False, hidden_size=512, intermediate_size=512, num_local_experts=16, head_dim=64,
                      num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)  # fmt: skip
    model = ScoutForConditionalGeneration(cfg)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "m", max_shard_size="40MB")
    del model
    script = textwrap.dedent(
        f"""
        import torch
        from scout_mm.model import ScoutForConditionalGeneration

        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        # Warm up first (library code pages count as RSS), then reset the peak-RSS mark (VmHWM).
        from scout_mm.config import ScoutConfig
        with torch.device("meta"):
            ScoutForConditionalGeneration(ScoutConfig.from_hf({str(tmp_path / "m")!r}))
        torch.randn(64, 64).sum()
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        model = ScoutForConditionalGeneration.from_pretrained({str(tmp_path / "m")!r})
        assert sum(float(p.float().sum()) for p in model.parameters()) == sum(float(p.float().sum()) for p in model.parameters())
        print(status("VmHWM") - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"weights {size / 1e6:.0f} MB, peak RSS growth {growth / 1e6:.0f} MB")
    assert size * 0.9 < growth < 1.5 * size


def test_convert_script_recasts_reshards_and_keeps_processor_files(tmp_path):
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    cmd = [sys.executable, "scripts/convert_hf.py", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"),
           "--dtype", "bfloat16", "--max-shard-size", "40KB"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == "{}"
    converted = ScoutForConditionalGeneration.from_pretrained(tmp_path / "dst")
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 290, (1, 9))
    with torch.no_grad():
        assert max_rel_err(converted.float()(ids).logits, model.to(torch.bfloat16).float()(ids).logits) < 1e-6


# ---------------------------------------------------------------------------------------- audit regressions
def test_hf_tie_flag_in_text_config_decides(tmp_path):
    """HF ties by text_config.tie_word_embeddings; a top-level True over an untied text config is inert."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = tiny_config(vision=True)
    hf_config = {**cfg.to_hf(), "tie_word_embeddings": True}  # text_config still says False
    hf = Llama4ForConditionalGeneration(Llama4Config(**hf_config, attn_implementation="eager")).eval()
    assert hf.language_model.lm_head.weight is not hf.language_model.model.embed_tokens.weight
    hf.save_pretrained(tmp_path / "h")
    ours = ScoutForConditionalGeneration.from_pretrained(tmp_path / "h")
    assert _same_logits(ours, hf, _inputs(cfg, True)) < TOL


def test_our_tied_model_stays_tied_in_hf(tmp_path):
    from transformers import Llama4ForCausalLM

    cfg = dataclasses.replace(tiny_config(vision=False), tie_word_embeddings=True)  # text.tie stays False
    ours = ScoutForConditionalGeneration(cfg).eval()
    ours.save_pretrained(tmp_path / "m")
    hf = Llama4ForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert _same_logits(ours, hf, _inputs(cfg, False)) < TOL
    again = ScoutForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert _same_logits(ours, again, _inputs(cfg, False)) == 0.0


def test_resave_states_the_new_dtype_for_transformers_5(tmp_path):
    """transformers 5 writes `dtype`; a stale one carried over from the source config would win over ours."""
    from transformers import Llama4ForCausalLM

    cfg = tiny_config(vision=False)
    hf_model(cfg).save_pretrained(tmp_path / "h")  # config.json: "dtype": "float32"
    ScoutForConditionalGeneration.from_pretrained(tmp_path / "h", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "m"
    )
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["dtype"], saved["torch_dtype"]) == ("bfloat16", "bfloat16")
    assert Llama4ForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.bfloat16


def test_saved_config_loads_in_transformers_5_with_scouts_int_temperature_tuning(tmp_path):
    from transformers import Llama4ForCausalLM

    model = ScoutForConditionalGeneration(tiny_config(vision=False, attn_temperature_tuning=4)).eval()
    model.save_pretrained(tmp_path / "m")  # HF Scout's config.json stores 4; transformers 5 wants a bool
    hf = Llama4ForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert _same_logits(model, hf, _inputs(model.config, False)) < TOL


def test_mixed_dtype_checkpoint_loads_in_the_config_dtype(saved):
    state = load_file(saved / "model.safetensors")
    state = {k: v.bfloat16() if "router" in k else v for k, v in state.items()}
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    model = ScoutForConditionalGeneration.from_pretrained(saved)  # config.json says float32, as HF "auto"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        model(torch.randint(3, 290, (1, 9)))


def test_unsupported_dtype_argument_or_device(saved):
    for dtype in (torch.int8, torch.float8_e4m3fn, "int4"):
        with pytest.raises(ValueError, match=rf"dtype .*{str(dtype).removeprefix('torch.')}.*bfloat16"):
            ScoutForConditionalGeneration.from_pretrained(saved, dtype=dtype)
    model = ScoutForConditionalGeneration.from_pretrained(saved, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for device in ("cuda:99", "nodevice"):
        with pytest.raises(ValueError, match=f"device '{device}'"):
            ScoutForConditionalGeneration.from_pretrained(saved, device=device)


def test_unsupported_stored_or_declared_dtype(saved):
    state = load_file(saved / "model.safetensors")
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "torch_dtype": "int8"}))
    with pytest.raises(CheckpointError, match="torch_dtype='int8'"):
        ScoutForConditionalGeneration.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps(config))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(state, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight.*float8_e4m3fn"):
        ScoutForConditionalGeneration.from_pretrained(saved)


@pytest.mark.parametrize("index", ['{"weight_map": ["model.safetensors"]}', "[1, 2]", '{"weight_map": 3}'])
def test_malformed_index(saved, index):
    (saved / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_saved_checkpoint_is_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        ScoutForConditionalGeneration(tiny_config(vision=False)).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert {(tmp_path / "m" / f).stat().st_mode & 0o777 for f in os.listdir(tmp_path / "m")} == {0o644}


def test_failed_save_over_a_checkpoint_keeps_it(tmp_path, monkeypatch):
    import scout_mm.checkpoint as ckpt

    cfg = tiny_config(vision=False)
    first = ScoutForConditionalGeneration(cfg).eval()
    first.save_pretrained(tmp_path / "m")
    calls = []

    def fails_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return save_file(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", fails_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        ScoutForConditionalGeneration(cfg).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert os.listdir(tmp_path) == ["m"]
    kept = ScoutForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert _same_logits(first, kept, _inputs(cfg, False)) == 0.0


@pytest.mark.parametrize("size", ["abc", "5G B", 0, "-1MB"])
def test_bad_max_shard_size_is_named(tmp_path, size):
    model = ScoutForConditionalGeneration(tiny_config(vision=False))
    with pytest.raises(ValueError, match=f"max_shard_size={size!r}"):
        model.save_pretrained(tmp_path / "m", max_shard_size=size)
    assert os.listdir(tmp_path) == []


def _convert(monkeypatch, *args):
    import runpy

    monkeypatch.setattr(sys, "argv", ["convert_hf.py", *map(str, args)])
    runpy.run_path("scripts/convert_hf.py", run_name="__main__")


@pytest.mark.parametrize(
    "args, match",
    [
        (["--src", "{tmp}/none", "--dst", "{tmp}/out"], "checkpoint folder .*none does not exist"),
        (
            ["--src", "{saved}/config.json", "--dst", "{tmp}/out"],
            r"config.json is a file; pass the checkpoint folder \(",
        ),
        (["--src", "{saved}", "--dst", "{tmp}/out", "--max-shard-size", "lots"], "max_shard_size='lots'"),
        (["--src", "{saved}", "--dst", "/proc/no/such/dir"], "cannot write /proc/no/such/dir"),
    ],
)
def test_convert_script_errors_are_one_line(saved, monkeypatch, capsys, args, match):
    args = [a.format(tmp=saved.parent, saved=saved) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        _convert(monkeypatch, *args)
    message = str(exit_info.value.code)
    assert message.startswith("convert_hf.py: error:") and "\n" not in message
    assert re.search(match, message)


def test_convert_script_in_place_keeps_processor_files(saved, monkeypatch):
    (saved / "tokenizer.json").write_text("{}")
    _convert(monkeypatch, "--src", saved, "--dst", saved, "--dtype", "bfloat16")
    assert (saved / "tokenizer.json").read_text() == "{}"
    model = ScoutForConditionalGeneration.from_pretrained(saved)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_nonzero_shared_expert_is_not_dropped_silently(tmp_path):
    ScoutForConditionalGeneration(tiny_config(vision=False, use_shared_expert=False)).save_pretrained(
        tmp_path
    )
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.feed_forward.shared_expert.up_proj.weight"
    assert not state[key].any()  # the zeros we write for HF
    state[key] = torch.randn(state[key].shape)  # e.g. edited in transformers afterwards
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key}.*use_shared_expert=false"):
        ScoutForConditionalGeneration.from_pretrained(tmp_path)


def test_checkpoints_written_before_the_dtype_and_tie_fixes_still_load(tmp_path):
    # scout_mm's older writer kept a stale "dtype" from its source config next to the right torch_dtype, and
    # put a tied model's flag at the top level only (text_config false, no LM head stored).
    cfg = dataclasses.replace(tiny_config(vision=True), tie_word_embeddings=True)
    model = ScoutForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    hf = json.loads(config_file.read_text())
    hf["dtype"], hf["torch_dtype"] = "bfloat16", "float32"
    hf["tie_word_embeddings"], hf["text_config"]["tie_word_embeddings"] = True, False
    config_file.write_text(json.dumps(hf))
    assert not any("lm_head" in k for k in load_file(tmp_path / "m" / "model.safetensors"))
    loaded = ScoutForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # the tensors', not the stale key's
    assert loaded.config.tie_word_embeddings
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    ids = torch.randint(3, 290, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # untied with no LM head stored: the error says why
    hf["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="lm_head.*untied"):
        ScoutForConditionalGeneration.from_pretrained(tmp_path / "m")


def test_tensor_stored_in_two_shards_is_refused(saved):
    # Which copy would load depended on shard order (Int4 and quantize's reader: test_quant.py).
    tensors = load_file(saved / "model.safetensors")
    key = next(k for k in tensors if k.endswith("model.norm.weight"))  # text-only: HF's unprefixed names
    save_file({key: tensors[key] + 1}, saved / "extra.safetensors", metadata={"format": "pt"})
    index = {"weight_map": dict.fromkeys(tensors, "model.safetensors") | {key: "extra.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{key}' is stored twice"):
        ScoutForConditionalGeneration.from_pretrained(saved)


def test_sigterm_while_writing_removes_the_temporary_folder(tmp_path):
    """A scheduler's kill (SIGTERM) of scripts/quantize.py or convert_hf.py left `<out>.tmp-<hex>` (GBs for Scout)
    beside the output; with exit_cleanly_on_sigterm it is removed, as on Ctrl-C, and nothing appears at `out`."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from scout_mm.checkpoint import exit_cleanly_on_sigterm, write_folder_atomically

        def write(tmp):
            open(os.path.join(tmp, "model.safetensors"), "wb").write(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        exit_cleanly_on_sigterm()
        write_folder_atomically({str(tmp_path / "out")!r}, write)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + 15, done.stderr
    assert os.listdir(tmp_path) == []
