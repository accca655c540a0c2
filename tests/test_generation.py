"""Generation: cached decoding vs full recomputation, HF greedy parity, batching, cache memory, sampling
processors vs HF's, streaming, and bad input."""

from __future__ import annotations

import pytest
import torch

from scout_mm.cache import KVCache
from scout_mm.generation import GenerateOutput, SamplingParams, generate_ids, process_logits
from scout_mm.model import ScoutForConditionalGeneration
from tests.helpers import hf_model, ours_from_hf, tiny_config

CONFIGS = {
    "top1_shared_chunk8": dict(),
    "top2_chunk5_nope3": dict(
        num_experts_per_tok=2, use_shared_expert=False, attention_chunk_size=5, no_rope_layer_interval=3
    ),  # fmt: skip
    "no_chunking": dict(attention_chunk_size=None, num_experts_per_tok=2),
}


def _prompt(cfg, length, image_tiles=0):
    ids = torch.randint(3, cfg.image_token_index - 5, (1, length))
    if not image_tiles:
        return ids, None
    n = image_tiles * cfg.vision.tokens_per_tile
    ids = torch.cat([ids[:, :2], torch.full((1, n), cfg.image_token_index), ids[:, 2:]], dim=1)
    size = cfg.vision.image_size
    return ids, torch.randn(image_tiles, 3, size, size)


def _full_recompute(model, ids, pixel_values, steps):
    """Greedy decoding by running the whole sequence each step. Generated ids are plain token embeddings
    (a random model may sample the image-token id), exactly as the cached decode treats them."""
    with torch.no_grad():
        embeds, _ = model.embed_inputs(ids, pixel_values)
        seq = ids
        for _ in range(steps):
            nxt = model(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            embeds = torch.cat([embeds, model.get_input_embeddings()(nxt[:, None])], dim=1)
    return seq


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("image_tiles", [0, 2], ids=["text", "image"])
def test_cached_greedy_equals_full_recomputation(name, image_tiles):
    cfg = tiny_config(vision=True, **CONFIGS[name])
    model = ScoutForConditionalGeneration(cfg).eval()
    ids, pixels = _prompt(cfg, 19, image_tiles)
    steps = 37  # prompt + output cross the 5/8-token chunks many times
    expected = _full_recompute(model, ids, pixels, steps)
    for piece in (None, 3):  # whole chunks, and pieces that end mid-chunk
        got = model.generate(
            ids, pixel_values=pixels, max_new_tokens=steps, eos_token_id=[], prefill_piece=piece
        )
        assert torch.equal(got, expected), (name, piece)


@pytest.mark.parametrize("name", ["top1_shared_chunk8", "top2_chunk5_nope3"])
@pytest.mark.parametrize("image_tiles", [0, 1], ids=["text", "image"])
def test_greedy_matches_hf_generate(name, image_tiles):
    cfg = tiny_config(vision=True, **CONFIGS[name])
    hf = hf_model(cfg)
    ours = ours_from_hf(cfg, hf)
    ids, pixels = _prompt(cfg, 23, image_tiles)
    extra = {} if pixels is None else {"pixel_values": pixels}
    ours_ids = ours.generate(ids, max_new_tokens=30, eos_token_id=[], **extra)
    hf_ids = hf.generate(input_ids=ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0,
                         **extra)  # fmt: skip
    assert torch.equal(ours_ids, hf_ids)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_generation_equals_one_by_one(side):
    cfg = tiny_config(vision=True, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg).eval()
    prompts = [_prompt(cfg, n)[0][0] for n in (7, 19, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        where = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, where], mask[b, where] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=17, eos_token_id=[])
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=17, eos_token_id=[])
        assert torch.equal(batched[b, width:], alone[0, len(p) :])


def test_per_sequence_stopping_pads_after_eos():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 9))
    free = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 9 + 3])  # make row 0's 4th generated token the EOS
    out = generate_ids(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    row = out.sequences[0, 9:].tolist()
    stop = row.index(eos)
    assert stop <= 3 and all(t == 0 for t in row[stop + 1 :])
    assert out.finished[0]


@pytest.mark.parametrize("eos_at", [0, 5, 11])
def test_stop_counts_and_finished_flags(eos_at):
    """Row 0 stops at its generated token ``eos_at`` (0 = the token from prefill, 11 = the last step), row 1
    never does: sequences, ``new_tokens`` and ``finished`` follow, however far the decode loop ran ahead."""
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 7))
    free = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 7 + eos_at])
    out = generate_ids(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    rows = out.sequences[:, 7:].tolist()
    stops = [row.index(eos) if eos in row else None for row in free[:, 7:].tolist()]
    for b in range(2):
        end = 12 if stops[b] is None else stops[b] + 1  # the EOS itself is kept, pads after it
        assert rows[b][:end] == free[b, 7 : 7 + end].tolist()
        assert all(t == 0 for t in rows[b][end:])
        assert out.finished[b] == (stops[b] is not None)
    steps = max(12 if s is None else s + 1 for s in stops)  # the loop ends when every row has stopped
    assert out.sequences.shape[1] == 7 + steps
    assert out.new_tokens == sum(min(12 if s is None else s + 1, steps) for s in stops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_ahead_decode_stops_like_cpu():
    """On CUDA the next step is queued before a step's tokens are read: EOS handling, padding and counts
    must still equal the synchronous CPU loop's (fp32, so both devices pick the same tokens)."""
    cfg = tiny_config(vision=False, num_experts_per_tok=2)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (3, 11))
    free = model.generate(ids, max_new_tokens=16, eos_token_id=[])
    eos = [int(free[0, 11 + 4]), int(free[2, 11 + 9])]
    cpu = generate_ids(model, ids, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    model.cuda()
    for graph in (True, False):
        gpu = generate_ids(
            model, ids.cuda(), max_new_tokens=16, eos_token_id=eos, pad_token_id=0, cuda_graph=graph
        )
        assert torch.equal(gpu.sequences.cpu(), cpu.sequences)
        assert gpu.sequences.device.type == "cuda"
        assert (gpu.new_tokens, gpu.finished) == (cpu.new_tokens, cpu.finished)


def test_ring_cache_memory_is_constant_and_global_memory_linear():
    cfg = tiny_config(vision=False, attention_chunk_size=8, no_rope_layer_interval=2)
    sizes = {}
    for length in (16, 256, 1024):
        cache = KVCache(cfg.text, batch_size=1, device="cpu", dtype=torch.float32, block_size=16)
        cache.reserve(0, length)
        sizes[length] = cache.memory_bytes()
    assert sizes[16]["ring"] == sizes[256]["ring"] == sizes[1024]["ring"] > 0
    per_token = 2 * 2 * cfg.text.num_key_value_heads * cfg.text.head_dim * 4  # 2 layers, k+v, fp32
    for length, size in sizes.items():
        assert size["global"] == (length + 16) * per_token  # + the pool's scratch block


def test_prefill_pieces_never_exceed_a_chunk(monkeypatch):
    cfg = tiny_config(vision=False, attention_chunk_size=8)
    model = ScoutForConditionalGeneration(cfg).eval()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            seen.append(kwargs["inputs_embeds"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    model.generate(torch.randint(3, 290, (1, 45)), max_new_tokens=2, eos_token_id=[], prefill_piece=6)
    assert sum(seen) == 45 and max(seen) <= 6


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_embedded_piece_by_piece_equals_the_batch_embedding(side):
    # Prefill embeds each piece as it is reached (a long prompt's embeddings never exist whole); every piece
    # must equal the slice of the whole batch's embeddings, image rows included, whatever the padding.
    from scout_mm.generation import _PromptPieces

    cfg = tiny_config(vision=True)
    model = ScoutForConditionalGeneration(cfg).eval()
    rows = [_prompt(cfg, 7, 1), _prompt(cfg, 3), _prompt(cfg, 5, 2)]
    longest = max(ids.shape[1] for ids, _ in rows)
    input_ids = torch.zeros(3, longest, dtype=torch.long)
    attention_mask = torch.zeros(3, longest, dtype=torch.bool)
    for b, (ids, _) in enumerate(rows):
        cols = slice(longest - ids.shape[1], longest) if side == "left" else slice(0, ids.shape[1])
        input_ids[b, cols], attention_mask[b, cols] = ids[0], True
    pixels = torch.cat([p for _, p in rows if p is not None])
    with torch.no_grad():
        whole, _ = model.embed_inputs(input_ids, pixels)
        _, image_embeds = model.image_token_embeddings(input_ids, pixels)
        batch_pieces = _PromptPieces.for_batch(model, input_ids, attention_mask, image_embeds)
        text_only = _PromptPieces.for_batch(model, input_ids, attention_mask, None)
        for b, pieces in enumerate(batch_pieces):
            expected = whole[b : b + 1, attention_mask[b]]
            ids = input_ids[b : b + 1, attention_mask[b]]
            assert torch.equal(text_only[b].embed(0, ids.shape[1]), model.embed_tokens(ids))
            length = expected.shape[1]
            for start, end in ((0, 1), (1, 4), (2, 3), (0, length), (3, length), (length - 1, length)):
                if start < length:  # prefill asks for pieces that start inside the prompt
                    assert torch.equal(pieces.embed(start, end), expected[:, start:end]), (b, start, end)


# ------------------------------------------------------------------------------------------- sampling
def _hf_processed(logits, history, **kw):
    from transformers.generation import logits_process as lp

    procs = []
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k"):
        procs.append(lp.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        procs.append(lp.TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        procs.append(lp.MinPLogitsWarper(kw["min_p"]))
    scores = logits.clone()
    for p in procs:
        scores = p(history, scores)
    return scores


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
        dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=0.8),
    ],
)
def test_logit_processing_matches_hf(kw):
    logits = torch.randn(3, 97) * 3
    history = torch.randint(0, 97, (3, 11))
    ours = process_logits(logits, history, SamplingParams(do_sample=True, **kw))
    theirs = _hf_processed(logits, history, **kw)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(ours)
    # ours are shifted so that each row's top score is 0: compare the sampling distributions (log-probabilities)
    assert torch.allclose(ours.log_softmax(-1)[finite], theirs.log_softmax(-1)[finite], atol=1e-5)


def test_tiny_temperature_samples_the_top_token_instead_of_nan():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 9))
    scores = process_logits(torch.randn(2, 97) * 3, ids, SamplingParams(do_sample=True, temperature=1e-40))
    assert not scores.isnan().any() and torch.equal(scores.amax(-1), torch.zeros(2))
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    sampled = model.generate(
        ids, max_new_tokens=6, eos_token_id=[], do_sample=True, temperature=1e-40, seed=0
    )
    assert torch.equal(sampled, greedy)


def test_sampling_is_deterministic_with_a_seed_and_top_k_1_is_greedy():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 9))
    a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    c = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(
        model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=3, eos_token_id=[]), greedy
    )


def test_temperature_zero_is_greedy():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 9))
    kw = dict(max_new_tokens=8, eos_token_id=[])
    greedy = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, temperature=0.0, **kw), greedy)
    assert torch.equal(model.generate(ids, do_sample=True, temperature=0.0, seed=1, **kw), greedy)


def test_top_k_0_disables_top_k_and_top_p_0_keeps_the_top_token_as_hf():
    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 9))
    kw = dict(max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=1.5, seed=4)
    assert torch.equal(model.generate(ids, top_k=0, **kw), model.generate(ids, **kw))
    greedy = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(model.generate(ids, top_p=0.0, **kw), greedy)


def test_sampling_settings_without_do_sample_warn():
    import warnings

    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defaults and temperature=0 say nothing
        greedy = model.generate(ids, max_new_tokens=4, eos_token_id=[])
        model.generate(ids, max_new_tokens=4, eos_token_id=[], temperature=0.0)
    with pytest.warns(UserWarning, match="temperature=0.7, top_p=0.9 ignored: do_sample=False") as record:
        out = model.generate(ids, max_new_tokens=4, eos_token_id=[], temperature=0.7, top_p=0.9)
    assert torch.equal(out, greedy)
    assert [w.filename for w in record] == [__file__]  # the warning points at the caller's line
    from scout_mm.generation import generate_ids

    with pytest.warns(UserWarning, match="top_k=5 ignored") as record:
        generate_ids(model, ids, max_new_tokens=2, eos_token_id=[], top_k=5)
    assert [w.filename for w in record] == [__file__]


# ------------------------------------------------------------------------------------------- text API
@pytest.fixture(scope="module")
def tiny_model_and_processor():
    from scout_mm import Processor, ScoutConfig

    torch.manual_seed(0)
    cfg = ScoutConfig.from_preset("tiny", num_hidden_layers=2)
    return ScoutForConditionalGeneration(cfg).eval(), Processor.from_config(cfg)


def test_streaming_yields_the_same_text(tiny_model_and_processor):
    from PIL import Image

    import scout_mm

    model, processor = tiny_model_and_processor
    image = Image.new("RGB", (200, 150), (200, 30, 30))
    kw = dict(max_new_tokens=24, do_sample=True, temperature=2.0, seed=1)
    text = scout_mm.generate(model, processor, "Describe the image.", images=[image], **kw)
    pieces = list(
        scout_mm.generate(model, processor, "Describe the image.", images=[image], stream=True, **kw)
    )
    assert len(pieces) > 1 and "".join(pieces) == text


def test_batch_of_text_prompts(tiny_model_and_processor):
    import scout_mm

    model, processor = tiny_model_and_processor
    answers = scout_mm.generate(
        model, processor, ["Hello there", "What colour is the sky?"], max_new_tokens=5
    )
    single = scout_mm.generate(model, processor, "What colour is the sky?", max_new_tokens=5)
    assert len(answers) == 2 and answers[1] == single


def test_stop_strings_stop_generation(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    ids = processor("Some prompt text")["input_ids"]
    free = generate_ids(model, ids, max_new_tokens=20, eos_token_id=[], do_sample=True, seed=2).sequences
    text = processor.decode(free[0, ids.shape[1] :].tolist())
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "random output too short for this test"
    out = generate_ids(model, ids, max_new_tokens=20, eos_token_id=[], do_sample=True, seed=2, stop_strings=[stop],
                       tokenizer=processor)  # fmt: skip
    assert out.finished[0] and out.new_tokens < 20
    assert stop in processor.decode(out.sequences[0, ids.shape[1] :].tolist())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text_api_takes_eos_token_id_none_or_int(tiny_model_and_processor, stream):
    import scout_mm

    model, processor = tiny_model_and_processor
    kw = dict(max_new_tokens=6, stream=stream)
    expected = scout_mm.generate(model, processor, "Hello", max_new_tokens=6)
    for eos in (None, processor.eot_token_id, torch.tensor(processor.eot_token_id)):
        answer = scout_mm.generate(model, processor, "Hello", eos_token_id=eos, **kw)
        assert (answer if not stream else "".join(answer)) == expected


def test_text_api_answer_ends_at_its_stop_string_whatever_the_pad_id(tiny_model_and_processor):
    """Row 0 stops at a stop string while row 1 goes on: row 0 is then padded with pad_token_id, which here is a
    plain token; the answer must not decode that padding."""
    import scout_mm

    model, processor = tiny_model_and_processor
    prompts = ["Some prompt text", "Another, longer prompt text"]
    free = scout_mm.generate(model, processor, prompts, max_new_tokens=16, eos_token_id=[])
    start = len(free[0]) // 3
    stop = next(free[0][i : i + 2] for i in range(start, len(free[0])) if free[0][i : i + 2] not in free[1])
    pad = processor.encode("zq", add_special_tokens=False)[0]
    stats = GenerateOutput(sequences=torch.empty(0))
    answers = scout_mm.generate(model, processor, prompts, max_new_tokens=16, eos_token_id=[], stop_strings=[stop],
                                pad_token_id=pad, stats=stats)  # fmt: skip
    assert stats.finished == [True, False] and stats.new_lengths[0] < stats.new_lengths[1] == 16
    assert stop in answers[0] and free[0].startswith(answers[0])
    assert answers[1] == free[1]


def _scripted_answer(monkeypatch, processor, text):
    """Make the model "say" ``text``: sampling replaced by the token ids of ``text`` in order, then ``!`` forever."""
    import scout_mm.generation as generation

    script = iter(processor.encode(text, add_special_tokens=False))
    filler = processor.encode("!", add_special_tokens=False)[0]

    def scripted(scores, params, generator):
        return torch.full((scores.shape[0],), next(script, filler), dtype=torch.long)

    monkeypatch.setattr(generation, "sample", scripted)


@pytest.mark.parametrize("stop", ["😀😃😄", "龘靐齉爩麤", "Sure"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings_of_multibyte_characters_stop_generation(
    tiny_model_and_processor, monkeypatch, stop, stream
):
    """Emoji and rare CJK characters are split into single-byte tokens: a stop string of a few of them spans more
    tokens than it has characters, and must still stop the answer right after it."""
    import scout_mm

    model, processor = tiny_model_and_processor
    answer = f"Sure {stop} and then more text that should never be generated"
    _scripted_answer(monkeypatch, processor, answer)
    stats = GenerateOutput(sequences=torch.empty(0))
    out = scout_mm.generate(model, processor, "hi", max_new_tokens=40, eos_token_id=[], stop_strings=[stop],
                            stream=stream, stats=stats)  # fmt: skip
    text = "".join(out) if stream else out
    assert text == answer[: answer.index(stop) + len(stop)] and stats.finished == [True]


def test_streamed_pieces_of_split_multibyte_characters_equal_the_whole_text(
    tiny_model_and_processor, monkeypatch
):
    import scout_mm

    model, processor = tiny_model_and_processor
    answer = "Voilà: 😀 naïve 龘靐 — До свидания ✓"
    # characters split into bytes
    assert len(processor.encode(answer, add_special_tokens=False)) > len(answer)
    _scripted_answer(monkeypatch, processor, answer)
    kw = dict(max_new_tokens=60, eos_token_id=[])
    whole = scout_mm.generate(model, processor, "hi", **kw)
    _scripted_answer(monkeypatch, processor, answer)
    pieces = list(scout_mm.generate(model, processor, "hi", stream=True, **kw))
    assert whole.startswith(answer) and "".join(pieces) == whole
    assert not any("\ufffd" in piece for piece in pieces)  # no piece ends inside a character


class _CountingTokenizer:
    def __init__(self, processor):
        self.processor, self.longest = processor, 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return self.processor.decode(ids, skip_special_tokens=skip_special_tokens)


def test_text_delta_is_incremental_and_exact():
    """Streaming decodes a few ids per token, not the whole answer, and its pieces join to the whole decode:
    for text with multi-byte characters and for random ids (byte soup with invalid UTF-8, special tokens)."""
    from scout_mm import Processor
    from scout_mm.generation import TextDelta

    processor = Processor.from_pretrained("builtin")
    text = "Hello 😀😃 world, 龘靐齉 café — ✓ " * 20
    generator = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, processor.vocab_size, (400,), generator=generator).tolist()
    for ids in (processor.encode(text, add_special_tokens=False), random_ids):
        counting = _CountingTokenizer(processor)
        delta = TextDelta(counting)
        pieces = [delta.push(token) for token in ids] + [delta.flush()]
        assert "".join(pieces) == processor.decode(ids, skip_special_tokens=True)
        assert counting.longest < 16, counting.longest
        if ids != random_ids:  # valid UTF-8: no piece ends inside a character
            assert not any("\ufffd" in piece for piece in pieces)


def test_stop_string_check_decodes_a_bounded_window():
    from scout_mm import Processor
    from scout_mm.generation import _hit_stop_string

    processor = Processor.from_pretrained("builtin")
    stop = "😀😃😄"
    ids = processor.encode("x " * 50 + stop + " y", add_special_tokens=False)
    counting, texts, hits = _CountingTokenizer(processor), [[]], []
    for token in ids:
        hits.append(_hit_stop_string(texts, torch.tensor([token]), [stop], counting)[0])
    first = hits.index(True)
    assert stop in processor.decode(ids[: first + 1]) and stop not in processor.decode(ids[:first])
    assert counting.longest <= len(stop.encode()) + 2


def test_stream_checks_its_input_at_the_call(tiny_model_and_processor):
    import scout_mm

    model, processor = tiny_model_and_processor
    for bad, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=10**6), "exceeds")]:
        with pytest.raises(ValueError, match=match):
            scout_mm.generate(model, processor, "Hello", stream=True, **bad)  # no iteration needed


def test_stream_fills_decode_stats(tiny_model_and_processor):
    """A stream that ends at a stop token still reports its decode time and finished flags."""
    import scout_mm

    model, processor = tiny_model_and_processor
    ids = processor.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    free = generate_ids(model, ids, max_new_tokens=12, eos_token_id=[]).sequences
    kw = dict(max_new_tokens=12, eos_token_id=[int(free[0, -4])])  # a stop token the answer reaches
    stats = GenerateOutput(sequences=torch.empty(0))
    pieces = list(scout_mm.generate(model, processor, "Hello", stream=True, stats=stats, **kw))
    assert "".join(pieces) == scout_mm.generate(model, processor, "Hello", **kw)
    assert stats.new_tokens > 0 and stats.decode_seconds > 0 and stats.finished == [True]
    assert stats.new_lengths == [stats.new_tokens]


def test_none_sampling_values_mean_defaults_and_numpy_eos_ids():
    # transformers' generation config passes None for "default"; ids may come as numpy arrays.
    import numpy as np

    model = ScoutForConditionalGeneration(tiny_config(vision=False)).eval()
    ids = torch.randint(3, 290, (1, 6))
    base = generate_ids(model, ids, max_new_tokens=5, eos_token_id=[])
    same = generate_ids(
        model, ids, max_new_tokens=5, eos_token_id=[], temperature=None, repetition_penalty=None
    )
    assert torch.equal(same.sequences, base.sequences)
    stop = int(base.sequences[0, -3])
    from scout_mm.generation import generate_steps

    params = SamplingParams(
        max_new_tokens=5, temperature=None, repetition_penalty=None
    )  # streams take None too
    streamed = torch.stack(
        [tokens for tokens, _ in generate_steps(model, ids, params=params, eos_token_id=[])], 1
    )
    assert torch.equal(streamed, base.sequences[:, ids.shape[1] :])
    by_array = generate_ids(model, ids, max_new_tokens=5, eos_token_id=np.array([stop]))
    by_list = generate_ids(model, ids, max_new_tokens=5, eos_token_id=[stop])
    assert torch.equal(by_array.sequences, by_list.sequences) and by_array.new_lengths == by_list.new_lengths


# ------------------------------------------------------------------------------------------- bad input
def test_bad_generation_inputs():
    cfg = tiny_config(vision=False)  # max_position_embeddings=512
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (1, 500))
    with pytest.raises(ValueError, match="exceeds the model maximum of 512"):
        model.generate(ids, max_new_tokens=20)
    assert model.generate(ids, max_new_tokens=20, truncate=True, eos_token_id=[]).shape[1] == 512
    short = ids[:, :5]
    for bad, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_strings=["x"]), "tokenizer"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(short, **bad)
    with pytest.raises(ValueError, match="empty"):
        model.generate(short, attention_mask=torch.zeros_like(short))


def test_malformed_generation_arguments_are_named():
    import numpy as np

    cfg = tiny_config(vision=False)
    model = ScoutForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 290, (2, 5))
    for bad, error, match in [
        (dict(input_ids=ids[:0]), ValueError, r"input_ids shape \(0, 5\)"),
        (dict(input_ids=ids.tolist()), TypeError, "expected an integer torch.Tensor"),
        (dict(input_ids=ids.float()), TypeError, "expected an integer torch.Tensor"),
        (dict(eos_token_id="2"), TypeError, "eos_token_id='2'"),
        (dict(stop_strings=[""], tokenizer=object()), ValueError, "non-empty strings"),
        (dict(prefill_piece=-2), ValueError, "prefill_piece=-2"),
        (dict(max_new_tokens=True), ValueError, "max_new_tokens=True"),
        (dict(do_sample=True, temperature=-0.5), ValueError, "temperature=-0.5"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k=-1"),
    ]:
        with pytest.raises(error, match=match):
            generate_ids(model, **{"input_ids": ids, "max_new_tokens": 3, **bad})
    # numpy ints and integer tensors are ids too
    out = generate_ids(model, ids, max_new_tokens=np.int64(3), eos_token_id=torch.tensor(2), do_sample=True,
                       top_k=np.int64(5), seed=0)  # fmt: skip
    assert out.sequences.shape == (2, 5 + max(out.new_lengths)) and max(out.new_lengths) <= 3


def test_wrongly_typed_arguments_are_named_before_generating(monkeypatch):
    import scout_mm.generation as generation

    def no_generation(*args, **kwargs):
        raise AssertionError("generation ran before the bad argument was reported")

    monkeypatch.setattr(generation, "prefill_pieces", no_generation)
    model = ScoutForConditionalGeneration(tiny_config(vision=False)).eval()
    ids = torch.randint(3, 290, (1, 5))
    for bad, match in [
        (dict(do_sample=True, temperature="0.7"), "temperature='0.7'; expected a number"),
        (dict(do_sample=True, top_p="0.9"), "top_p='0.9'; expected a number"),
        (dict(do_sample="yes"), "do_sample='yes'; expected True or False"),
        (dict(seed="a"), "seed='a'; expected an int"),
        (dict(pad_token_id="x"), "pad_token_id='x'; expected a token id"),
        (dict(input_ids=ids.to(torch.uint8)), "torch.uint8; expected an integer torch.Tensor"),
        (dict(input_ids=ids.bool()), "torch.bool; expected an integer torch.Tensor"),
        (dict(input_ids=ids.to(torch.int16)), "torch.int16; expected an integer torch.Tensor"),
    ]:
        with pytest.raises(TypeError, match=match):
            generate_ids(model, **{"input_ids": ids, "max_new_tokens": 3, **bad})


def test_text_api_names_wrongly_typed_prompt_and_stats(tiny_model_and_processor, monkeypatch):
    import scout_mm
    import scout_mm.generation as generation

    def no_generation(*args, **kwargs):
        raise AssertionError("generation ran before the bad argument was reported")

    monkeypatch.setattr(generation, "prefill_pieces", no_generation)
    model, processor = tiny_model_and_processor
    message = {"role": "user", "content": "hi"}
    for prompt in (5, None, b"hi", message, [message, "yo"]):
        with pytest.raises(TypeError, match="prompt is .*; expected a string, a list of chat messages"):
            scout_mm.generate(model, processor, prompt)
    for stream in (False, True):
        with pytest.raises(TypeError, match="stats is dict; expected a GenerateOutput"):
            scout_mm.generate(model, processor, "Hello", stats={}, stream=stream)


def test_unsupported_model_dtype_or_meta_device_is_named():
    cfg = tiny_config(vision=False)
    ids = torch.randint(3, 290, (1, 5))
    model = ScoutForConditionalGeneration(cfg).eval().to(torch.float8_e4m3fn)
    with pytest.raises(
        ValueError, match="model is torch.float8_e4m3fn on cpu; generation needs weights in one of"
    ):
        model.generate(ids, max_new_tokens=2)
    with torch.device("meta"):
        model = ScoutForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="on meta; generation needs"):
        model.generate(ids, max_new_tokens=2)


def test_prompt_filling_the_context_is_named():
    cfg = tiny_config(vision=False)  # max_position_embeddings=512
    model = ScoutForConditionalGeneration(cfg).eval()
    with pytest.raises(ValueError, match="prompt of 512 tokens leaves no room"):
        model.generate(torch.randint(3, 290, (1, 512)), max_new_tokens=1, truncate=True)
    with pytest.raises(
        ValueError, match=r"truncate=True, or --truncate in scripts/generate.py, generates at most 12"
    ):
        model.generate(torch.randint(3, 290, (1, 500)), max_new_tokens=20)


def test_bad_text_api_inputs(tiny_model_and_processor):
    import scout_mm

    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="empty prompt"):
        scout_mm.generate(model, processor, "   ")
    with pytest.raises((ValueError, FileNotFoundError)):
        scout_mm.generate(model, processor, "Look", images=["/no/such/image.png"])
    with pytest.raises(TypeError):
        scout_mm.generate(model, processor, "Look", images=[42])


def test_image_only_prompt_is_the_chat_form_with_image_parts_only(tiny_model_and_processor):
    from PIL import Image

    import scout_mm

    model, processor = tiny_model_and_processor
    image = Image.new("RGB", (40, 30), (0, 0, 255))
    chat = [{"role": "user", "content": [{"type": "image"}]}]
    expected = scout_mm.generate(model, processor, chat, images=[image], max_new_tokens=4)
    assert scout_mm.generate(model, processor, "", images=[image], max_new_tokens=4) == expected
    batch = scout_mm.generate(model, processor, ["", "Hi"], images=[image, None], max_new_tokens=4)
    assert batch[0] == expected
    with pytest.raises(ValueError, match="prompt 1 is empty: pass a text, images, or both"):
        scout_mm.generate(model, processor, ["Hi", " "], max_new_tokens=4)


def test_batch_of_chat_conversations_equals_one_by_one(tiny_model_and_processor):
    from PIL import Image

    import scout_mm

    model, processor = tiny_model_and_processor
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (30, 60), (0, 0, 255))
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image", "image": red},
                                                                                   {"type": "text", "text": "Colour?"}]}],
        "Plain text too",
    ]  # fmt: skip
    kw = dict(max_new_tokens=4)
    answers = scout_mm.generate(model, processor, conversations, **kw)
    assert answers == [scout_mm.generate(model, processor, c, **kw) for c in conversations]
    # a single prompt takes its images as one per-prompt list too
    both = scout_mm.generate(model, processor, "Compare", images=[red, blue], **kw)
    assert scout_mm.generate(model, processor, "Compare", images=[[red, blue]], **kw) == both


def test_batch_needs_one_image_entry_per_prompt(tiny_model_and_processor):
    from PIL import Image

    import scout_mm

    model, processor = tiny_model_and_processor
    image = Image.new("RGB", (40, 30), (0, 0, 255))
    for images in (image, [image]):
        with pytest.raises(ValueError, match="2 prompts but .* image lists; expected one entry per prompt"):
            scout_mm.generate(model, processor, ["Look", "Hi"], images=images, max_new_tokens=2)


def test_cli_demo_prints_answer_and_speed():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "scripts/generate.py", "--demo", "--max-new-tokens", "8", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    import os

    # The demo uses the shipped trained model when the package has one, random weights (and says so) otherwise.
    trained = os.path.isfile("scout_mm/assets/tiny/config.json")
    assert ("RANDOM weights" in out.stderr) != trained
    assert "prefill" in out.stderr and "tok/s" in out.stderr
    if trained:  # the shipped model names the example image's colours (red, green, blue shapes)
        assert any(colour in out.stdout for colour in ("red", "green", "blue")), out.stdout


def test_cli_quantize_then_generate_recognises_int4(tmp_path):
    """scripts/quantize.py on the shipped tiny model, then scripts/generate.py on its output without --int4: the
    Int4 checkpoint is recognised from its config.json, loaded as Int4, and still names the image's colours."""
    import subprocess
    import sys

    int4_dir = tmp_path / "int4"
    subprocess.run(
        [sys.executable, "scripts/quantize.py", "--model", "scout_mm/assets/tiny", "--out", str(int4_dir),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "scripts/generate.py", "--model", str(int4_dir), "--image", "scout_mm/assets/example.png",
         "--prompt", "What shapes are in the image?", "--max-new-tokens", "12", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "loading it as Int4" in out.stderr and "Int4 model:" in out.stderr, out.stderr
    assert any(colour in out.stdout for colour in ("red", "green", "blue")), out.stdout


def test_cli_rejects_missing_model():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/generate.py"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--model" in out.stderr
    out = subprocess.run(
        [sys.executable, "scripts/generate.py", "--model", "/no/such/folder", "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr and "/no/such/folder" in out.stderr


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--temperature", "-1"], "--temperature -1.0: expected >= 0"),
        (["--top-p", "0.9"], "--top-p samples: pass --temperature > 0"),
        (["--temperature", "nan"], "--temperature nan: expected >= 0"),
    ],
)
def test_cli_rejects_bad_sampling_flags(monkeypatch, capsys, argv, match):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("generate_cli", "scripts/generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--demo", *argv])
    with pytest.raises(SystemExit):
        cli.main()
    assert match in capsys.readouterr().err


def test_cli_passes_an_empty_prompt_and_truncate(monkeypatch, capsys):
    """--prompt '' asks about the images alone (not the demo's default question); --truncate reaches generate."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("generate_cli", "scripts/generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    seen = {}

    def fake_run(model, processor, prompt, images, stream, sampling):
        seen.update(prompt=prompt, sampling=sampling)
        return GenerateOutput(sequences=torch.empty(0))

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(
        sys, "argv", ["generate.py", "--demo", "--device", "cpu", "--prompt", "", "--truncate"]
    )
    cli.main()
    assert seen["prompt"] == "" and seen["sampling"]["truncate"] is True


def test_paged_blocks_across_many_small_blocks(monkeypatch):
    """Small blocks: each global-layer sequence spans many blocks of the shared pool, found via its table."""
    import functools

    import scout_mm.generation as generation

    monkeypatch.setattr(generation, "KVCache", functools.partial(KVCache, block_size=4))
    cfg = tiny_config(vision=False, num_experts_per_tok=2, attention_chunk_size=8)
    model = ScoutForConditionalGeneration(cfg).eval()
    prompts = [torch.randint(3, 290, (n,)) for n in (13, 6, 21)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=25, eos_token_id=[])
    for b, p in enumerate(prompts):
        expected = _full_recompute(model, p[None], None, 25)
        assert torch.equal(batched[b, width:], expected[0, len(p) :])
