"""The Int4 scripts as a user runs them: ``scripts/quantize.py`` (scout_mm and transformers checkpoints, RTN and
GPTQ, group sizes, symmetric and asymmetric), ``scripts/int4_generate.py`` and ``scripts/generate.py --int4``
on CPU, and their answers to bad input (one ``<script>: error:`` line naming the problem, no traceback, no
output folder left behind).

Scripts run in this process (``runpy``): a subprocess would pay the torch import every time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import shutil
import sys
from importlib.resources import files

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import scout_mm
from scout_mm import Processor, ScoutConfig, ScoutForConditionalGeneration
from scout_mm.quant import (
    QuantConfig,
    calibration_from_jsonl,
    calibration_set,
    load_quantized,
    quantize_checkpoint,
    quantize_model,
    save_quantized,
)
from tests.helpers import hf_model, one_torch_thread, tiny_config  # noqa: F401 (fixture)

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
TRAINED_TINY = str(files("scout_mm") / "assets" / "tiny")
EXAMPLE = str(files("scout_mm") / "assets" / "example.png")
QUESTION = "What shapes are in the image?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # GPTQ: see tests.helpers


def run_script(monkeypatch, capsys, script: str, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``scripts/<script> args`` run as ``__main__``."""
    path = os.path.join(SCRIPTS, script)
    monkeypatch.setattr("sys.argv", [path, *map(str, args)])
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):  # sys.exit("message"): the interpreter would print it to stderr
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, script: str, *phrases: str) -> None:
    assert code != 0 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{script}: error:"), err
    for phrase in phrases:
        assert phrase in line, err


def small_float_checkpoint(folder, seed: int, vision: bool = True) -> ScoutForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny_config(vision=vision, hidden_size=128, intermediate_size=64, num_local_experts=4,
                      num_experts_per_tok=2, use_shared_expert=True)  # fmt: skip
    model = ScoutForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    return model


def logits(model, ids, pixel_values=None):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values).logits


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def image_prompt(processor) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return processor(processor.apply_chat_template(messages, add_generation_prompt=True), images=[EXAMPLE])


@pytest.fixture(scope="module")
def int4_tiny(tmp_path_factory) -> str:
    """The shipped trained tiny model quantized (RTN, group 128), as scripts/quantize.py writes it."""
    folder = tmp_path_factory.mktemp("int4") / "tiny-int4"
    quantize_checkpoint(TRAINED_TINY, folder, QuantConfig())
    return str(folder)


# ---------------------------------------------------------------------------------------------- quantize.py


@pytest.mark.parametrize(("group_size", "symmetric"), [(32, True), (64, False)], ids=["g32-sym", "g64-asym"])
def test_quantize_cli_writes_what_in_memory_quantization_gives(tmp_path, monkeypatch, capsys, group_size,
                                                               symmetric):  # fmt: skip
    model = small_float_checkpoint(tmp_path / "float", seed=40)
    args = ["--model", tmp_path / "float", "--out", tmp_path / "int4", "--group-size", group_size]
    args += ["--device", "cpu"] + ([] if symmetric else ["--asymmetric"])
    code, out, err = run_script(monkeypatch, capsys, "quantize.py", *args)
    assert code == 0, err
    assert f"-> {tmp_path / 'int4'}" in out and f"group {group_size}" in out, out
    loaded = load_quantized(tmp_path / "int4", dtype=torch.float32, device="cpu")
    cfg = QuantConfig(group_size=group_size, symmetric=symmetric)
    assert loaded.quant_config == cfg
    ids = torch.randint(3, 290, (2, 12))
    pixels = torch.randn(1, 3, 56, 56)
    ids[0, 2:6] = model.config.image_token_index  # the tiny vision tower gives 4 features per tile
    assert torch.equal(logits(loaded, ids, pixels), logits(quantize_model(model, cfg), ids, pixels))


def test_quantize_cli_reads_a_transformers_checkpoint(tmp_path, monkeypatch, capsys):
    # A folder written by transformers' own save_pretrained (its key names, fused expert tensors, shards).
    cfg = tiny_config(vision=True, hidden_size=128, intermediate_size=64, num_local_experts=4,
                      num_experts_per_tok=1, use_shared_expert=True)  # fmt: skip
    hf_model(cfg, seed=41).save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    args = ["--model", tmp_path / "hf", "--out", tmp_path / "int4", "--group-size", 32, "--asymmetric"]
    code, _, err = run_script(monkeypatch, capsys, "quantize.py", *args, "--device", "cpu")
    assert code == 0, err
    loaded = load_quantized(tmp_path / "int4", dtype=torch.float32, device="cpu")
    qcfg = QuantConfig(group_size=32, symmetric=False)
    expected = quantize_model(ScoutForConditionalGeneration.from_pretrained(tmp_path / "hf"), qcfg)
    ids = torch.randint(3, 290, (1, 16))
    assert torch.equal(logits(loaded, ids), logits(expected, ids))


def test_quantize_cli_gptq_on_the_trained_tiny_model(tmp_path, monkeypatch, capsys):
    # GPTQ from the CLI: the processor-made calibration set of the checkpoint's own tokenizer, the same codes as
    # in-memory GPTQ on that set, and logits close to the float model's on an image question.
    args = ["--model", TRAINED_TINY, "--out", tmp_path / "int4", "--method", "gptq"]
    args += ["--calibration-samples", 2, "--device", "cpu"]
    code, out, err = run_script(monkeypatch, capsys, "quantize.py", *args)
    assert code == 0 and "gptq, group 128" in out, err
    assert "calibration: 2 samples" in out and "from the built-in set" in out and "\nGPTQ: " in out, out
    stored = ScoutForConditionalGeneration.from_pretrained(TRAINED_TINY).eval()  # bf16, as the CLI computes
    processor = Processor.from_config(stored.config, tokenizer_path=TRAINED_TINY)
    save_quantized(quantize_model(stored, QuantConfig(method="gptq"), calibration_set(processor, 2)),
                   tmp_path / "in_memory")  # fmt: skip
    inputs = image_prompt(processor)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    float_model = ScoutForConditionalGeneration.from_pretrained(TRAINED_TINY, dtype=torch.float32).eval()
    reference = logits(float_model, ids, pixels)
    loaded = load_quantized(tmp_path / "int4", dtype=torch.float32, device="cpu")
    assert loaded.quant_config.method == "gptq"
    out_logits = logits(loaded, ids, pixels)
    expected = load_quantized(tmp_path / "in_memory", dtype=torch.float32, device="cpu")
    assert torch.equal(out_logits, logits(expected, ids, pixels))
    # Int4 error on a trained model is a few percent (RTN 3.7%, GPTQ 1.7% here); random weights have no such bound.
    assert rel(out_logits, reference) < 0.1
    assert (out_logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    for name in ("tokenizer.json", "processor_config.json"):  # the Int4 folder answers prompts on its own
        assert (tmp_path / "int4" / name).read_bytes() == open(os.path.join(TRAINED_TINY, name), "rb").read()


def test_quantize_cli_gptq_calibrates_a_text_only_model_with_text_prompts(tmp_path, monkeypatch, capsys):
    # was: image prompts in the calibration set, which a text-only model cannot embed ("pixel_values given, but this
    # is a text-only model"). The builtin tokenizer's image ids cannot fit a text-only config.json (transformers'
    # text-only layout keeps no image ids, so they read back as Llama 4's), so the processor is made here as
    # Processor.from_config makes it for a text-only model with a fitting tokenizer: no image processor.
    torch.manual_seed(45)
    config = dataclasses.replace(
        ScoutConfig.from_preset("tiny"), vision=None
    )  # the builtin tokenizer's vocab
    ScoutForConditionalGeneration(config).save_pretrained(tmp_path / "float")

    def text_only_processor(config, tokenizer_path="builtin", **overrides):
        assert config.vision is None
        processor = Processor.from_pretrained(tokenizer_path)
        processor.image_processor = None
        return processor

    monkeypatch.setattr(Processor, "from_config", text_only_processor)
    args = ["--model", tmp_path / "float", "--out", tmp_path / "int4", "--method", "gptq", "--group-size", 32]
    code, _, err = run_script(
        monkeypatch, capsys, "quantize.py", *args, "--calibration-samples", 2, "--device", "cpu"
    )
    assert code == 0, err
    loaded = load_quantized(tmp_path / "int4", dtype=torch.float32, device="cpu")
    assert loaded.config.vision is None and loaded.quant_config.method == "gptq"


def calibration_file(folder) -> str:
    """A jsonl file in the training formats: text documents, and a conversation about an image beside it."""
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "shapes.png")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": "A red square and a blue circle."}]  # fmt: skip
    records = [{"text": " ".join(f"word{i}" for i in range(n))} for n in (30, 400, 60, 200)]
    records.append({"messages": conversation, "images": ["shapes.png"]})
    (folder / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder / "calib.jsonl")


def test_quantize_cli_gptq_calibrates_on_a_jsonl_file(tmp_path, monkeypatch, capsys):
    # --calibration-data with a token budget and a sequence cut: the same samples and tensors as the Python API,
    # a line saying what was read, and the summary of how each matrix was quantized.
    data = calibration_file(tmp_path / "data")
    args = [
        "--model",
        TRAINED_TINY,
        "--out",
        tmp_path / "int4",
        "--method",
        "gptq",
        "--calibration-data",
        data,
    ]
    args += ["--calibration-tokens", 900, "--calibration-seq-len", 320, "--device", "cpu"]
    code, out, err = run_script(monkeypatch, capsys, "quantize.py", *args)
    assert code == 0, err
    processor = Processor.from_config(ScoutConfig.from_hf(TRAINED_TINY), tokenizer_path=TRAINED_TINY)
    samples = calibration_from_jsonl(processor, data, max_tokens=900, max_seq_len=320)
    assert any("pixel_values" in sample for sample in samples)
    assert f"calibration: {len(samples)} samples, 900 tokens from {data}" in out, out
    report = quantize_checkpoint(TRAINED_TINY, tmp_path / "api", QuantConfig(method="gptq"), samples)
    assert report.gptq > 0 and report.summary() in out.splitlines(), out
    written, expected = (load_file(tmp_path / name / "model.safetensors") for name in ("int4", "api"))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in written)
    assert load_quantized(tmp_path / "int4", device="cpu").quant_config.gptq_min_rows_ratio == 1 / 16


def test_quantize_cli_calibration_errors_are_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    gptq = ["--model", TRAINED_TINY, "--out", tmp_path / "int4", "--device", "cpu", "--method", "gptq"]
    cases = [
        (["--calibration-data", bad], f"{bad}:2: 'text' is a int; expected a string"),
        (["--calibration-data", tmp_path / "missing.jsonl"], f"No such file or directory: '{tmp_path}"),
        (
            ["--calibration-data", bad, "--calibration-seq-len", 0],
            "--calibration-seq-len 0: expected at least 1",
        ),
        (
            ["--calibration-tokens", 1000],
            "--calibration-tokens applies to --calibration-data, which is not given",
        ),
        (["--gptq-min-rows-ratio", -1], "gptq_min_rows_ratio=-1.0; expected a number >= 0"),
        (["--method", "rtn", "--calibration-data", bad], "--calibration-data is for --method gptq"),
        (["--method", "rtn", "--calibration-samples", 8], "--calibration-samples is for --method gptq"),
        (["--method", "rtn", "--gptq-min-rows-ratio", 0.5], "--gptq-min-rows-ratio is for --method gptq"),
        (["--method", "rtn", "--gptq-natural-order"], "--gptq-natural-order is for --method gptq"),
    ]
    for extra, phrase in cases:
        code, _, err = run_script(monkeypatch, capsys, "quantize.py", *gptq, *extra)
        assert_one_line_error(code, err, "quantize.py", phrase)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output folder


def test_quantize_cli_refuses_an_existing_out_folder_unless_overwrite(tmp_path, monkeypatch, capsys):
    small_float_checkpoint(tmp_path / "float", seed=42)
    other = small_float_checkpoint(tmp_path / "other", seed=43)
    before = sorted(os.listdir(tmp_path / "other"))
    args = ["--model", tmp_path / "float", "--out", tmp_path / "other", "--group-size", 32, "--device", "cpu"]
    code, _, err = run_script(monkeypatch, capsys, "quantize.py", *args)
    # was: exit 0, the other model's float weights replaced by Int4 ones of this model
    phrases = f"output folder {tmp_path / 'other'} already exists", "--overwrite"
    assert_one_line_error(code, err, "quantize.py", *phrases)
    assert sorted(os.listdir(tmp_path / "other")) == before
    ids = torch.randint(3, 290, (1, 8))
    assert torch.equal(logits(ScoutForConditionalGeneration.from_pretrained(tmp_path / "other"), ids),
                       logits(other, ids))  # fmt: skip
    code, _, err = run_script(monkeypatch, capsys, "quantize.py", *args, "--overwrite")
    assert code == 0, err
    assert load_quantized(tmp_path / "other", dtype=torch.float32, device="cpu").quant_config.group_size == 32


def test_quantize_cli_bad_options_and_checkpoints_are_one_line_errors(tmp_path, monkeypatch, capsys):
    small_float_checkpoint(tmp_path / "float", seed=44)
    out = tmp_path / "int4"
    base = ["--model", tmp_path / "float", "--out", out, "--device", "cpu"]  # a later --device wins
    cases = [
        # was: RuntimeError "Tensor.item() cannot be called on meta tensors" from inside pack_int4
        (["--device", "meta"], "device meta; Int4 models run on 'cuda'"),
        (["--device", "cuda:99"], "device 'cuda:99'"),
        (["--group-size", "128"], "self_attn.o_proj: input dim 64 is not a multiple of group size 128"),
        (["--method", "gptq", "--calibration-samples", "0"], "--calibration-samples 0"),
        # was: "config and tokenizer disagree: ..." with no word of where a fitting tokenizer comes from
        (["--method", "gptq", "--group-size", "32"], f"{tmp_path / 'float'} has no tokenizer.json"),
    ]
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        cases.append((["--device", "xpu"], "device 'xpu' is not available"))  # was: AssertionError traceback
    for extra, phrase in cases:
        code, _, err = run_script(monkeypatch, capsys, "quantize.py", *base, *extra)
        assert_one_line_error(code, err, "quantize.py", phrase)
    code, _, err = run_script(monkeypatch, capsys, "quantize.py", *base, "--group-size", "48")
    assert code == 2 and "invalid choice: 48" in err, err  # argparse: only 32, 64, 128
    # A truncated shard: named, before anything is written.
    shard = tmp_path / "float" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, _, err = run_script(monkeypatch, capsys, "quantize.py", *base, "--group-size", "32")
    assert_one_line_error(code, err, "quantize.py", f"cannot read {shard}: corrupt or not a safetensors file")
    assert sorted(os.listdir(tmp_path)) == ["float"]  # no output folder, finished or not


# ----------------------------------------------------------------------------------- int4_generate.py / --int4


def test_int4_generate_answers_and_reports_speed_and_memory(int4_tiny, monkeypatch, capsys):
    model = load_quantized(int4_tiny, dtype=torch.float32, device="cpu")
    processor = Processor.from_config(model.config, tokenizer_path=int4_tiny)
    expected = scout_mm.generate(model, processor, QUESTION, images=[EXAMPLE], max_new_tokens=12)
    assert expected.strip()
    args = ["--model", int4_tiny, "--image", EXAMPLE, "--prompt", QUESTION, "--max-new-tokens", 12]
    for script, extra in (("int4_generate.py", []), ("generate.py", ["--int4"])):
        code, out, err = run_script(monkeypatch, capsys, script, *args, "--device", "cpu", *extra)
        assert code == 0, err
        assert out.strip() == expected.strip(), (out, err)
        assert "tok/s" in err and "GB of weights" in err and "peak process memory" in err, err


def test_int4_generate_help_is_its_own(monkeypatch, capsys):
    code, out, _ = run_script(monkeypatch, capsys, "int4_generate.py", "--help")
    assert code == 0 and out.startswith("usage: int4_generate.py")
    assert "Answer an image+text prompt with an Int4 checkpoint" in out  # was generate.py's description


def test_int4_generate_bad_input_is_a_one_line_error(int4_tiny, tmp_path, monkeypatch, capsys):
    def run(*args, model=int4_tiny, prompt=QUESTION):
        return run_script(monkeypatch, capsys, "int4_generate.py", "--model", model, "--prompt", prompt,
                          "--max-new-tokens", 4, "--device", "cpu", *args)  # fmt: skip

    corrupt, deep, missing = tmp_path / "corrupt.png", tmp_path / "deep.png", tmp_path / "missing.png"
    corrupt.write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint16)).save(deep)  # 16-bit grey: not an 8-bit mode
    images = [(corrupt, "not a readable image file"), (deep, "mode 'I;16'"), (missing, "no file at"),
              (tmp_path, "is a folder, not an image file")]  # fmt: skip
    for image, phrase in images:
        code, _, err = run("--image", image)
        assert_one_line_error(code, err, "int4_generate.py", "image 0", phrase)
    code, _, err = run(prompt="word " * 5000)  # the trained tiny model has 4096 positions
    assert_one_line_error(code, err, "int4_generate.py", "leaves no room to generate", "4096 positions")
    code, _, err = run_script(monkeypatch, capsys, "int4_generate.py", "--model", int4_tiny, "--prompt", "hi",
                              "--device", "cuda:99")  # fmt: skip
    assert_one_line_error(code, err, "int4_generate.py", "device 'cuda:99'")
    code, _, err = run(model=TRAINED_TINY)  # a float checkpoint given to the Int4 script
    assert_one_line_error(code, err, "int4_generate.py", "has no quantization_config: not an Int4 checkpoint")

    def broken_copy(name, edit_config=None, edit_bytes=None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for entry in os.listdir(int4_tiny):
            (folder / entry).write_bytes(open(os.path.join(int4_tiny, entry), "rb").read())
        if edit_config:
            hf = json.loads((folder / "config.json").read_text())
            edit_config(hf)
            (folder / "config.json").write_text(json.dumps(hf))
        if edit_bytes:
            shard = folder / "model.safetensors"
            shard.write_bytes(edit_bytes(shard.read_bytes()))
        return str(folder)

    cases = [
        # group size recorded wrong: the scales' shape disagrees, named with the tensor and the config
        (broken_copy("g64", lambda hf: hf["quantization_config"].update(group_size=64)),
         ["model.safetensors: tensor", "but the config (group_size=64"]),
        (broken_copy("g48", lambda hf: hf["quantization_config"].update(group_size=48)),
         ["config.json: bad quantization_config: group_size=48"]),
        # zero points recorded that were never written: the missing tensors are named
        (broken_copy("asym", lambda hf: hf["quantization_config"].update(symmetric=False)),
         ["tensors missing from the checkpoint", "zeros"]),
        (broken_copy("experts", lambda hf: hf["text_config"].update(num_local_experts=8)),
         ["feed_forward.experts", "expects (8,"]),
        (broken_copy("truncated", edit_bytes=lambda data: data[: len(data) - 100]),
         ["model.safetensors: corrupt or not a safetensors file"]),
    ]  # fmt: skip
    for folder, phrases in cases:
        code, _, err = run(model=folder)
        assert_one_line_error(code, err, "int4_generate.py", folder, *phrases)
