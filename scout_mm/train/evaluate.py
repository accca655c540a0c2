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
        prompts = [processor.apply_chat_template(s.messages(with_answer=False)) for s in chunk]
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
