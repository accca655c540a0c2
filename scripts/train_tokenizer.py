"""Build the package's small byte-level BPE tokenizer: ``scout_mm/assets/tokenizer/tokenizer.json``.

    python scripts/train_tokenizer.py [--out DIR]

8192 ids: 0..7935 are BPE tokens, 7936..8191 are the first 256 Llama 4 special tokens in their Llama 4 order
(Llama 4 id 200000 + r is our id 7936 + r). The pipeline copies Llama 4's: the o200k split regex, byte-level
mapping without a prefix space, and a post-processor that prepends ``<|begin_of_text|>``.

The corpus is built offline and deterministically: English prose from the Python documentation topics and
stdlib docstrings that ship with the interpreter, plus seeded synthetic sentences about shapes, colours,
counts and positions (the words the synthetic image-text tasks use). The output is reproducible for a given
Python version and ``tokenizers`` version; the script prints SHA-256 digests of the corpus and the file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import os
import random
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-threaded training: no scheduling-dependent ties

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from scout_mm.chat_format import llama4_special_tokens  # noqa: E402
from scout_mm.config import SMALL_SPECIAL_OFFSET, SMALL_VOCAB_SIZE  # noqa: E402
from scout_mm.processor import BUILTIN_TOKENIZER_DIR  # noqa: E402

# The pre-tokenization regex of Llama 4 (tiktoken's o200k pattern).
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

STDLIB_MODULES = sorted(
    """abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime
    decimal difflib email enum fractions functools gzip hashlib heapq html http.client inspect io itertools
    json logging math mimetypes operator os pathlib pickle pprint queue random re shutil socket sqlite3
    statistics string struct subprocess tarfile tempfile textwrap threading time timeit typing unittest
    urllib.parse uuid warnings zipfile""".split()
)

SHAPES = "circle square triangle rectangle star hexagon diamond ellipse cross heart pentagon line dot".split()
COLOURS = "red green blue yellow orange purple pink brown black white gray cyan magenta".split()
SIZES = "small large tiny big medium".split()
POSITIONS = [
    "in the top left corner",
    "in the top right corner",
    "in the bottom left corner",
    "in the bottom right corner",
    "in the center",
    "at the top",
    "at the bottom",
    "on the left",
    "on the right",
    "near the middle",
]
RELATIONS = "to the left of|to the right of|above|below|next to|inside|far from|touching".split("|")
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
BACKGROUNDS = "white black gray blue dark light plain striped".split()


def docs_corpus() -> list[str]:
    """Prose that ships with the interpreter: pydoc topic pages and docstrings of common stdlib modules."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        texts.append(inspect.getdoc(module) or "")
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
                continue
            texts.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                for _, method in sorted(vars(member).items()):
                    if inspect.isroutine(method):
                        texts.append(inspect.getdoc(method) or "")
    return [t for t in texts if t]


def plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return word + ("es" if word.endswith(("x", "s", "sh")) else "s")


def synthetic_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """Sentences, questions and answers about shapes in an image, in the style of the synthetic tasks."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        shape, other = rng.sample(SHAPES, 2)
        colour, other_colour = rng.sample(COLOURS, 2)
        count = rng.randint(0, 12)
        count_text = rng.choice([NUMBER_WORDS[count], str(count)])
        kind = rng.randrange(8)
        if kind == 0:
            lines.append(
                f"There {'is' if count == 1 else 'are'} {count_text} {colour} {plural(shape, count)} "
                f"{rng.choice(POSITIONS)}."
            )
        elif kind == 1:
            lines.append(f"The {colour} {shape} is {rng.choice(RELATIONS)} the {other_colour} {other}.")
        elif kind == 2:
            lines.append(f"How many {colour} {plural(shape, 2)} are in the image? Answer: {count_text}.")
        elif kind == 3:
            lines.append(f"What colour is the {shape} {rng.choice(POSITIONS)}? It is {colour}.")
        elif kind == 4:
            lines.append(f"What shape is {rng.choice(POSITIONS)}? A {rng.choice(SIZES)} {colour} {shape}.")
        elif kind == 5:
            x, y, w, h = (rng.randint(0, 999) for _ in range(4))
            lines.append(f"The {shape} is at x={x}, y={y} with width {w} and height {h} pixels.")
        elif kind == 6:
            lines.append(
                f"Describe the image. A {rng.choice(BACKGROUNDS)} background with a {rng.choice(SIZES)} "
                f"{colour} {shape} and {count_text} {other_colour} {plural(other, count)}."
            )
        else:
            lines.append(
                f"Is the {colour} {shape} {rng.choice(RELATIONS)} the {other}? {rng.choice(['Yes', 'No'])}."
            )
    return lines


def build_tokenizer(corpus: list[str]) -> Tokenizer:
    """Train the BPE part, then append the special tokens so they land at ids 7936..8191."""
    n_bpe = SMALL_SPECIAL_OFFSET
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if tokenizer.get_vocab_size() != n_bpe:
        raise RuntimeError(
            f"BPE training gave {tokenizer.get_vocab_size()} tokens; expected {n_bpe}: corpus too small"
        )
    specials = llama4_special_tokens(SMALL_VOCAB_SIZE - n_bpe)
    tokenizer.add_special_tokens(specials)
    bos = specials[0]
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, n_bpe)]
            ),
        ]
    )
    for rel, name in enumerate(specials):
        if tokenizer.token_to_id(name) != n_bpe + rel:
            raise RuntimeError(f"{name} got id {tokenizer.token_to_id(name)}; expected {n_bpe + rel}")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BUILTIN_TOKENIZER_DIR), help="output folder for tokenizer.json")
    parser.add_argument("--synthetic-sentences", type=int, default=60_000)
    args = parser.parse_args()

    corpus = docs_corpus() + synthetic_corpus(args.synthetic_sentences)
    corpus_digest = hashlib.sha256("\x00".join(corpus).encode()).hexdigest()
    tokenizer = build_tokenizer(corpus)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tokenizer.json")
    tokenizer.save(path, pretty=False)
    with open(path, "rb") as f:
        file_digest = hashlib.sha256(f.read()).hexdigest()
    print(
        f"python {sys.version.split()[0]}, corpus {sum(map(len, corpus))} chars sha256={corpus_digest[:16]}"
    )
    print(
        f"wrote {path}: {tokenizer.get_vocab_size()} ids, {os.path.getsize(path)} bytes sha256={file_digest[:16]}"
    )


if __name__ == "__main__":
    main()
