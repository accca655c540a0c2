"""Held-out evaluation on the synthetic tasks.

:func:`answer_accuracy` scores packed held-out documents in one teacher-forced forward pass each: a document
counts as correct when the argmax at every answer position (the answer tokens and the closing ``<|eot|>``)
is the target. That is exactly "greedy decoding reproduces the answer and then stops", without running the
decode loop. :func:`generation_accuracy` runs real greedy generation (KV cache, left-padded batches) to
confirm it on a subset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from scout_mm.generation import generate_ids
from scout_mm.train.data import IGNORE_INDEX, PackedBatch


@torch.no_grad()
def answer_accuracy(forward, batches: Sequence[PackedBatch], device) -> dict[str, float]:
    """``forward(batch) -> ScoutOutput`` on each batch; returns loss (mean over answer tokens), accuracy
    (share of documents answered exactly) and ``accuracy/<task>`` per synthetic task."""
    loss_sum, n_tokens = 0.0, 0
    correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for batch in batches:
        batch = batch.to(device)
        out = forward(batch)
        targets = batch.labels[:, 1:]
        answer = targets != IGNORE_INDEX
        n = int(answer.sum())
        loss_sum += float(out.loss) * n
        n_tokens += n
        wrong = (out.logits[:, :-1].argmax(-1) != targets) & answer
        doc_ids = batch.doc_ids[:, 1:]
        n_docs = len(batch.tasks)
        wrong_docs = torch.zeros(n_docs, dtype=torch.bool, device=device)
        wrong_docs[doc_ids[wrong]] = True
        has_answer = torch.zeros(n_docs, dtype=torch.bool, device=device)
        has_answer[doc_ids[answer]] = True
        for doc, (bad, scored) in enumerate(zip(wrong_docs.tolist(), has_answer.tolist())):
            if scored:
                tally = correct[batch.tasks[doc] or "all"]
                tally[0] += not bad
                tally[1] += 1
    total_right = sum(r for r, _ in correct.values())
    total = sum(n for _, n in correct.values())
    result = {"loss": loss_sum / max(n_tokens, 1), "accuracy": total_right / max(total, 1), "docs": total}
    for task, (right, n) in sorted(correct.items()):
        result[f"accuracy/{task}"] = right / n
    return result


@torch.no_grad()
def generation_accuracy(model, processor, samples, batch_size: int = 64, max_new_tokens: int = 24) -> dict:
    """Greedy generation (:func:`scout_mm.generation.generate_ids`, left-padded batches) on synthetic
    samples; exact match of the stripped answer."""
    model.eval()
    correct: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    examples = []
    stops = processor.stop_token_ids
    for first in range(0, len(samples), batch_size):
        chunk = samples[first : first + batch_size]
        prompts = [
            processor.apply_chat_template(s.messages(with_answer=False), add_generation_prompt=True)
            for s in chunk
        ]
        inputs = processor(prompts, images=[s.render() for s in chunk], padding_side="left").to(model.device)
        out = generate_ids(
            model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
            max_new_tokens=max_new_tokens, eos_token_id=stops,
        )  # fmt: skip
        prompt_len = inputs["input_ids"].shape[1]
        for sample, row in zip(chunk, out.sequences[:, prompt_len:].tolist()):
            ended = [i for i, token in enumerate(row) if token in stops]
            answer = processor.decode(row[: ended[0]] if ended else row, skip_special_tokens=True)
            tally = correct[sample.task]
            tally[0] += answer.strip() == sample.answer
            tally[1] += 1
            if len(examples) < 12:
                examples.append(
                    {
                        "task": sample.task,
                        "question": sample.question,
                        "expected": sample.answer,
                        "got": answer,
                    }
                )
    total_right = sum(r for r, _ in correct.values())
    total = sum(n for _, n in correct.values())
    result = {"accuracy": total_right / max(total, 1), "docs": total, "examples": examples}
    for task, (right, n) in sorted(correct.items()):
        result[f"accuracy/{task}"] = right / n
    return result


@torch.no_grad()
def model_forward(model):
    """``forward(batch)`` for :func:`answer_accuracy`: ``model`` on a packed batch (pixels in its dtype)."""

    def forward(batch):
        pixels = batch.pixel_values.to(model.dtype) if batch.pixel_values is not None else None
        return model(
            input_ids=batch.input_ids,
            pixel_values=pixels,
            position_ids=batch.position_ids,
            labels=batch.labels,
        )

    return forward


def heldout_examples(processor, n_docs: int, seed: int = 0, tasks=None) -> list:
    """The first ``n_docs`` held-out synthetic documents of data seed ``seed``."""
    from scout_mm.train.data import SyntheticSource

    source = SyntheticSource(processor, "heldout", seed, tasks)
    return [source[i] for i in range(n_docs)]


def pack_examples(
    examples, seq_len: int, processor, docs_per_batch: int = 64, align="doc"
) -> list[PackedBatch]:
    """``examples`` packed ``docs_per_batch`` at a time into rows of ``seq_len`` positions."""
    from scout_mm.train.data import pack

    return [
        pack(examples[i : i + docs_per_batch], seq_len, align, processor)
        for i in range(0, len(examples), docs_per_batch)
    ]


def heldout_report(
    model, processor, n_docs: int, seed: int = 0, tasks=None, docs_per_batch: int = 64, align="doc"
) -> dict[str, dict]:
    """:func:`answer_accuracy` of ``model`` on the first ``n_docs`` held-out synthetic documents, overall
    (``"all"``) and split by image layout (``"single-tile"`` / ``"multi-tile"`` canvases)."""
    from scout_mm.train.data import image_grid

    model.eval()
    examples = heldout_examples(processor, n_docs, seed, tasks)
    seq_len = max(len(e.ids) for e in examples)
    forward = model_forward(model)

    def score(group):
        batches = pack_examples(group, seq_len, processor, docs_per_batch, align)
        return answer_accuracy(forward, batches, model.device) if group else {"docs": 0}

    one_tile = [image_grid(processor, e.images[0].width, e.images[0].height) == (1, 1) for e in examples]
    single = [e for e, one in zip(examples, one_tile) if one]
    multi = [e for e, one in zip(examples, one_tile) if not one]
    return {"all": score(examples), "single-tile": score(single), "multi-tile": score(multi)}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> None:
    """``python -m scout_mm.train.evaluate [--model DIR]``: held-out accuracy of an exported model (default:
    the package's shipped tiny model), per task and per image layout."""
    import argparse
    import json

    from scout_mm import Processor, ScoutForConditionalGeneration

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=None, help="exported model folder (default: scout_mm/assets/tiny)")
    parser.add_argument("--docs", type=int, default=600, help="held-out documents (the first N)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the training run (data.seed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(_DTYPES), help="default: bf16 on GPU, fp32 on CPU"
    )
    args = parser.parse_args(argv)
    if args.docs < 1:
        parser.error(f"--docs {args.docs}; expected >= 1")
    import os

    path = args.model or os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny")
    default = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype = _DTYPES[args.dtype] if args.dtype else default
    model = ScoutForConditionalGeneration.from_pretrained(path, dtype=dtype, device=args.device)
    processor = Processor.from_config(model.config, tokenizer_path=path)
    report = heldout_report(model, processor, args.docs, args.seed)
    print(json.dumps({"model": path, "dtype": str(dtype), **report}, indent=1))


if __name__ == "__main__":
    main()
