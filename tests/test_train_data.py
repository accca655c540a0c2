"""Training data: chat tokenization with assistant-only labels, packing, and the resumable batch stream."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scout_mm import Processor, ScoutConfig, ScoutForConditionalGeneration
from scout_mm.train.data import (
    IGNORE_INDEX,
    Example,
    ImageRef,
    JsonlSource,
    Mixture,
    PackedStream,
    SyntheticSource,
    encode_conversation,
    make_loader,
    pack,
    plan_rows,
    truncate,
)
from scout_mm.train.loop import data_position
from scout_mm.train.synthetic import SyntheticTasks


@pytest.fixture(scope="module")
def config():
    return ScoutConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def processor(config):
    return Processor.from_config(config)


def _image(width=168, height=168, colour=(200, 30, 30)):
    image = Image.new("RGB", (width, height), colour)
    return ImageRef(width, height, lambda: image)


def test_conversation_ids_equal_the_processor_and_only_assistant_turns_are_labelled(processor):
    messages = [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And the colour?"},
        {"role": "assistant", "content": "red"},
    ]
    image = _image(336, 252)
    example = encode_conversation(processor, messages, [image])
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert example.ids == processor(text, images=[image.load()])["input_ids"][0].tolist()
    labelled = [t for t in example.labels if t != IGNORE_INDEX]
    assert processor.decode(labelled) == "A red square.<|eot|>red<|eot|>"
    # Labels are the ids themselves where set (the model shifts them).
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.ids, example.labels))


def test_whitespace_led_answer_still_labels_the_answer(processor):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\n  ok"}]
    example = encode_conversation(processor, messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    assert example.ids == processor.encode(text)
    assert processor.decode([t for t in example.labels if t != IGNORE_INDEX]).endswith("ok<|eot|>")


def test_image_count_mismatch_is_an_error(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="1 image placeholders but 0 images"):
        encode_conversation(processor, messages, [])


def test_plan_rows_keeps_short_documents_inside_one_chunk():
    lengths = [60, 70, 50, 200, 10, 128, 90]
    rows = plan_rows(lengths, seq_len=512, align=128)
    order = [doc for row in rows for doc, _ in row]
    assert order == list(range(len(lengths)))
    for row in rows:
        ends = []
        for doc, start in row:
            end = start + lengths[doc]
            assert end <= 512
            if lengths[doc] <= 128:
                assert start // 128 == (end - 1) // 128, (doc, start)
            else:
                assert start % 128 == 0
            ends.append((start, end))
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no overlap
    with pytest.raises(ValueError, match="600 tokens does not fit seq_len=512"):
        plan_rows([600], 512, None)


def test_one_document_per_row_sees_no_other_document(processor, config):
    source = SyntheticSource(processor, "train", seed=2)
    examples = [source[i] for i in range(12)]
    lengths = [len(e.ids) for e in examples]
    assert plan_rows(lengths, 512, "doc") == [[(d, 0)] for d in range(12)]
    with pytest.raises(ValueError, match="does not fit seq_len=40"):
        plan_rows(lengths, 40, "doc")
    batch = pack(examples, 512, "doc", processor)
    width = batch.input_ids.shape[1]
    assert width % 32 == 0 and max(lengths) <= width < max(lengths) + 32
    assert batch.input_ids.shape[0] == 12
    for doc, example in enumerate(examples):
        n = len(example.ids)
        assert batch.input_ids[doc, :n].tolist() == example.ids
        assert bool((batch.doc_ids[doc, :n] == doc).all()) and bool((batch.doc_ids[doc, n:] == -1).all())
    # A document's logits in its row equal those of the document alone; packed behind other documents they
    # do not (the tiny preset's global NoPE layer attends to every earlier token of the row).
    torch.manual_seed(0)
    model = ScoutForConditionalGeneration(config).eval()

    def logits(batch, row):
        out = model(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values.float(),
            position_ids=batch.position_ids,
        )
        return out.logits[row][batch.doc_ids[row] >= 0]

    target = 3
    alone = logits(pack(examples[target : target + 1], 512, "doc", processor), 0)
    rows = logits(pack(examples[:6], 512, "doc", processor), target)
    torch.testing.assert_close(rows, alone, atol=2e-5, rtol=1e-4)
    packed = pack(examples[:6], 1024, 128, processor)
    row = int((packed.doc_ids == target).nonzero()[0, 0])
    assert int(packed.doc_ids[row, 0]) != target  # the target document is not first in its row
    mixed = logits(packed, row)[(packed.doc_ids[row][packed.doc_ids[row] >= 0] == target)]
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_pack_restarts_positions_and_orders_image_tiles(processor):
    source = SyntheticSource(processor, "train", seed=0)
    examples = [source[i] for i in range(10)]
    batch = pack(examples, 512, 128, processor)
    assert batch.input_ids.shape[1] == 512 and batch.pixel_values.dtype == torch.bfloat16
    n_patch = int((batch.input_ids == processor.image_token_id).sum())
    assert batch.pixel_values.shape[0] * processor.tokens_per_tile == n_patch
    for doc, example in enumerate(examples):
        where = (batch.doc_ids == doc).nonzero()
        row, cols = int(where[0, 0]), where[:, 1]
        assert batch.input_ids[row, cols].tolist() == example.ids
        assert batch.position_ids[row, cols].tolist() == list(range(len(example.ids)))
    assert bool((batch.labels[~batch.token_mask] == IGNORE_INDEX).all())
    assert batch.tasks == [e.task for e in examples]


def test_loss_comes_from_assistant_tokens_only(processor, config):
    torch.manual_seed(0)
    model = ScoutForConditionalGeneration(config).eval()
    source = SyntheticSource(processor, "train", seed=0)
    batch = pack([source[i] for i in range(3)], 256, 128, processor)
    pixels = batch.pixel_values.float()
    out = model(
        input_ids=batch.input_ids, pixel_values=pixels, position_ids=batch.position_ids, labels=batch.labels
    )
    targets = batch.labels[:, 1:]
    answer = targets != IGNORE_INDEX
    decoded = [
        processor.decode(
            batch.labels[batch.doc_ids == d][batch.labels[batch.doc_ids == d] != IGNORE_INDEX].tolist()
        )
        for d in range(3)
    ]
    tasks = SyntheticTasks("train", seed=0)
    assert decoded == [tasks[d].answer + "<|eot|>" for d in range(3)]
    manual = F.cross_entropy(out.logits[:, :-1][answer].float(), targets[answer])
    torch.testing.assert_close(out.loss, manual)
    # Changing every non-answer label leaves the loss unchanged only because they are ignored: check that
    # labelling a prompt token would change it.
    prompt = batch.labels.clone()
    first_prompt = int(((prompt == IGNORE_INDEX) & batch.token_mask).nonzero()[1, 1])
    prompt[0, first_prompt] = batch.input_ids[0, first_prompt]
    changed = model(
        input_ids=batch.input_ids, pixel_values=pixels, position_ids=batch.position_ids, labels=prompt
    )
    assert not torch.allclose(changed.loss, out.loss)


def test_stream_order_is_independent_of_workers_ranks_and_resume(processor):
    source = SyntheticSource(processor, "train", seed=1)

    def stream(start=0, rank=0, world=1):
        return PackedStream(
            source, processor, docs_per_batch=3, seq_len=384, align=128, start=start, rank=rank, world=world
        )

    def take(loader, n):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    single = take(make_loader(stream(), 0), 4)
    assert [b.index for b in single] == [0, 1, 2, 3]
    workers = take(make_loader(stream(), 2), 4)
    assert [b.index for b in workers] == [0, 1, 2, 3]
    for a, b in zip(single, workers):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    ranks = [take(make_loader(stream(rank=r, world=2), 0), 2) for r in range(2)]
    assert [b.index for b in (ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1])] == [0, 1, 2, 3]
    assert torch.equal(ranks[1][1].input_ids, single[3].input_ids)
    resumed = take(make_loader(stream(start=2), 0), 2)
    assert [b.index for b in resumed] == [2, 3] and torch.equal(resumed[1].input_ids, single[3].input_ids)


def test_jsonl_text_and_chat_records(tmp_path, processor):
    Image.new("RGB", (200, 150), (0, 90, 200)).save(tmp_path / "blue.png")
    records = [
        {"text": "Plain text document."},
        {"image": "blue.png", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "blue"},
        ]},
    ]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = JsonlSource(processor, path, seed=0)
    seen = {}
    for i in range(4):  # two epochs, each a permutation of both records
        example = source[i]
        seen.setdefault(bool(example.images), []).append(example)
    assert len(seen[True]) == len(seen[False]) == 2
    text = seen[False][0]
    assert processor.decode(text.ids) == "<|begin_of_text|>Plain text document.<|end_of_text|>"
    assert text.labels[0] == IGNORE_INDEX and text.labels[1:] == text.ids[1:]
    chat = seen[True][0]
    assert processor.decode([t for t in chat.labels if t != IGNORE_INDEX]) == "blue<|eot|>"
    batch = pack([chat, text], 512, 128, processor)
    assert batch.pixel_values.shape[0] == 3  # 200x150 -> 1x2 tiles + the global tile
    mixed = Mixture([source, SyntheticSource(processor)], [1.0, 3.0], seed=0)
    assert {bool(mixed[i].task) for i in range(20)} == {True, False}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: keys \\['prompt'\\]"):
        JsonlSource(processor, bad)


CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    {"role": "assistant", "content": "blue"},
]


def test_jsonl_images_are_read_as_inference_reads_them(tmp_path, processor):
    """Training tiles equal the processor's for the same file: upright by its EXIF orientation (a phone photo's
    tile grid depends on it) and transparency composited onto white, not the colour under it."""
    import numpy as np
    from PIL import ExifTags

    rgba = np.zeros((150, 380, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, the left half fully transparent
    rgba[:, 190:, 3] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: upright it is 150 wide and 380 tall
    Image.fromarray(rgba, "RGBA").save(tmp_path / "phone.png", exif=exif.tobytes())
    record = {"image": "phone.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
    ]}  # fmt: skip
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    example = JsonlSource(processor, tmp_path / "data.jsonl", seed=0)[0]
    assert (example.images[0].width, example.images[0].height) == (150, 380)
    path = str(tmp_path / "phone.png")
    expected = processor("<|image|>", images=[path])
    layout = processor.image_token_ids(tuple(processor.image_processor([path])[1][0]))
    at = example.ids.index(layout[0])
    assert example.ids[at : at + len(layout)] == layout
    batch = pack([example], 1024, 128, processor)
    assert torch.equal(batch.pixel_values, expected["pixel_values"].to(torch.bfloat16))


@pytest.mark.parametrize(
    "lines, error",
    [
        # the file's line number (blank lines count), not json's position inside the line
        (['{"text": "a"}', "", '{"text": "c"'], r"bad.jsonl:3: invalid JSON: Expecting"),
        (['{"text": "a"}', '{"text": 5}'], r"bad.jsonl:2: 'text' is a int; expected a string"),
        (['["text"]'], r"bad.jsonl:1: a JSON list; expected an object"),
        (
            [json.dumps({"messages": CHAT, "images": ["nope.png"]})],
            r"bad.jsonl:1: image .*nope.png does not exist",
        ),
        ([json.dumps({"messages": CHAT})], r"bad.jsonl:1: 1 image placeholders but 0 images"),
        (
            [json.dumps({"messages": [{"role": "user", "content": 7}]})],
            r"bad.jsonl:1: message 0: content is int",
        ),
        (
            [json.dumps({"messages": CHAT, "images": "a.png"})],
            r"bad.jsonl:1: images 'a.png'; expected a list",
        ),
    ],
)
def test_jsonl_records_are_checked_when_the_file_is_read(tmp_path, processor, lines, error):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=error):
        JsonlSource(processor, bad)


def test_jsonl_with_a_byte_order_mark_reads_and_other_encodings_are_named(tmp_path, processor):
    records = [{"text": "première ligne"}, {"text": "second"}]
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # as Windows tools write UTF-8
    assert JsonlSource(processor, bom).records == JsonlSource(processor, plain).records == records
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(plain.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not UTF-8 text \(byte \d+: invalid"):
        JsonlSource(processor, latin)


def test_documents_longer_than_seq_len_are_truncated_and_reported(tmp_path, processor):
    Image.new("RGB", (336, 168), (0, 90, 200)).save(tmp_path / "wide.png")
    long_chat = {"messages": CHAT, "images": ["wide.png"]}
    records = [{"text": "short"}, {"text": "word " * 300}, long_chat]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    source = JsonlSource(processor, path, seed=0)
    order = source._permutation(0)
    docs = [source[i] for i in range(3)]
    text_doc, chat_doc = docs[order.index(1)], docs[order.index(2)]
    assert text_doc.origin == f"{path}:2" and len(text_doc.ids) > 300
    seq_len = len(chat_doc.ids) - 3  # cuts the chat inside its answer, after the image
    stream = PackedStream(source, processor, docs_per_batch=3, seq_len=seq_len, align="doc")
    batch = stream.batch(0)
    assert sorted(batch.truncated) == [
        f"{path}:2 ({len(text_doc.ids)} tokens)",
        f"{path}:3 ({len(chat_doc.ids)} tokens)",
    ]
    row = order.index(1)
    assert batch.input_ids[row].tolist() == text_doc.ids[:seq_len]
    assert batch.pixel_values.shape[0] == 3  # the chat's image (2 tiles + global) was kept whole
    # A cut inside an image's token layout drops the image and its tokens (tiles must match the tokens).
    boi = chat_doc.ids.index(processor.boi_token_id)
    cut = truncate(chat_doc, boi + 5, processor)
    assert cut.ids == chat_doc.ids[:boi] and cut.images == [] and len(cut.labels) == boi
    assert PackedStream(source, processor, 3, boi + 5, "doc").batch(0).pixel_values is None


def test_resume_with_another_micro_batch_size_starts_at_the_next_document(processor):
    class Numbered:  # document i is the single token i + 10
        def __getitem__(self, i):
            return Example([i + 10], [i + 10])

    saved = {"batches_consumed": 3, "documents_consumed": 6, "micro_batch_size": 2}
    consumed, offset, note = data_position(saved, 4)
    assert (consumed, offset) == (1, 2) and "continues at document 6" in note
    stream = PackedStream(Numbered(), processor, 4, 8, None, start=consumed, doc_offset=offset)
    assert stream.batch(consumed).input_ids[0, :4].tolist() == [16, 17, 18, 19]
    assert data_position(saved, 2) == (3, 0, None)
    assert data_position({"batches_consumed": 5}, 4) == (5, 0, None)  # checkpoints from before the count
    assert data_position({}, 4) == (0, 0, None)


def test_heldout_report_splits_by_image_layout(processor, config):
    from scout_mm.train.evaluate import heldout_report

    torch.manual_seed(0)
    model = ScoutForConditionalGeneration(config).eval()
    report = heldout_report(model, processor, 12, seed=0, docs_per_batch=8)  # doc 9 is multi-tile
    single, multi, whole = report["single-tile"], report["multi-tile"], report["all"]
    assert whole["docs"] == 12 and single["docs"] + multi["docs"] == 12 and multi["docs"] >= 1
    # The overall accuracy is the document-weighted mean of the two layouts, and the loss the same
    # documents' answer-token loss whichever way they are grouped into batches.
    mean = (single["accuracy"] * single["docs"] + multi["accuracy"] * multi["docs"]) / 12
    assert whole["accuracy"] == pytest.approx(mean)
    assert 0.0 < whole["loss"] and min(single["loss"], multi["loss"]) <= whole["loss"] <= max(
        single["loss"], multi["loss"]
    )
