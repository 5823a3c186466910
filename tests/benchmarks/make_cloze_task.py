"""Build the local zero-shot task ``orchestrator/evaluation/tasks/debian_cloze.jsonl`` from the Debian handbook.

Each example is a sentence of the handbook's prose (with the sentence before it, when there is
one, as extra context) whose last word is held out: the correct continuation is ``" word."``
and three distractors are the last words of other sentences that end with the same word
before it (so they fit the syntax), or else of sentences of the same chapter. The output is
deterministic for a given seed and input file.

Usage::

    python tests/benchmarks/make_cloze_task.py            # writes orchestrator/evaluation/tasks/debian_cloze.jsonl
    python tests/benchmarks/make_cloze_task.py --n 500 --out /tmp/cloze.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from pathlib import Path

import pyarrow.parquet as pq

log = logging.getLogger("make-cloze")
ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path("/work/shared/data/eval-debian-handbook.parquet")
OUT = ROOT / "orchestrator" / "tasks" / "debian_cloze.jsonl"
SENTENCE = re.compile(r"[A-Za-z][A-Za-z0-9 ,;:'()\-./]*")
LAST_WORD = re.compile(r"[a-z][a-z\-]{2,}\.")


def sentences(texts: list[str]) -> list[tuple[int, str, str]]:
    """``(document, previous_sentence_or_empty, sentence)`` for every clean prose sentence of 12-40 words."""
    out = []
    for d, doc in enumerate(texts):
        for para in doc.split("\n\n"):
            sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split()))
            for i, s in enumerate(sents):
                words = s.split()
                if not (12 <= len(words) <= 40 and SENTENCE.fullmatch(s) and LAST_WORD.fullmatch(words[-1])):
                    continue
                prev = sents[i - 1] if i > 0 and SENTENCE.fullmatch(sents[i - 1]) and len(sents[i - 1]) < 300 else ""
                out.append((d, prev, s))
    return out


def build(texts: list[str], n: int, seed: int, with_previous: bool = False) -> list[dict]:
    """``n`` cloze examples ``{"context", "choices", "label", "id"}`` (4 choices each).

    Args:
        texts: documents (chapters).
        n: examples to draw.
        seed: seed of the draws.
        with_previous: prepend the previous sentence to the context (makes the task easier).
    """
    pool = sentences(texts)
    rng = random.Random(seed)
    picked = rng.sample(range(len(pool)), n)
    endings: dict[int, set[str]] = {}
    after: dict[str, set[str]] = {}  # penultimate word -> last words that follow it somewhere in the book
    for d, _, s in pool:
        words = s.split()
        endings.setdefault(d, set()).add(words[-1])
        after.setdefault(words[-2].lower(), set()).add(words[-1])
    everywhere = set().union(*endings.values())
    examples = []
    for k, idx in enumerate(picked):
        doc, prev, sent = pool[idx]
        head, last = sent.rsplit(" ", 1)
        # distractors that follow the same word elsewhere fit the syntax ("the" -> a noun), and those of
        # the same chapter share its vocabulary: neither syntax nor topic alone gives the answer
        for pool_words in (after[head.split()[-1].lower()], endings[doc], everywhere):
            candidates = sorted(w for w in pool_words if w.lower() != last.lower())
            if len(candidates) >= 3:
                break
        distractors = rng.sample(candidates, 3)
        choices = [f" {w}" for w in [last, *distractors]]
        rng.shuffle(choices)
        context = f"{prev} {head}" if prev and with_previous else head
        examples.append({"id": f"debian-cloze-{k:04d}", "context": context, "choices": choices,
                         "label": choices.index(f" {last}")})
    return examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(SOURCE), help="parquet file with a text column")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-previous", action="store_true", help="prepend the previous sentence to each context")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    texts = pq.read_table(args.source, columns=["text"]).column("text").to_pylist()
    examples = build(texts, args.n, args.seed, args.with_previous)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    log.info("wrote %d examples to %s (%d bytes)", len(examples), out, out.stat().st_size)


if __name__ == "__main__":
    main()
