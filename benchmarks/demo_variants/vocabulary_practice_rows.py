"""Training rows for the built-in task with some cities and first names replaced by vocabulary words.

BENCHMARKS.md ("The default run's accuracy on unseen names") records the runs. A replacement word is a
capitalised word that the embedded tokenizer writes as one token after a space and in two or more pieces
without one (the spelling after a quote), and that no pool entity or sentence shape holds. ``proper-nouns``
keeps the words whose lower-case form is not a token (mostly names and places: " Kathleen", " Nebraska").

    python benchmarks/demo_variants/vocabulary_practice_rows.py 0.3 0.2 0 [proper-nouns] > train.jsonl
    tunesmith train data.train=train.jsonl seed=0

Arguments: share of rows whose city is replaced, share whose first name is (of the rest), data seed.
"""

from __future__ import annotations

import json
import random
import re
import sys

from transformers import AutoTokenizer

from tunesmith.data.builtin import builtin_task, format_answer
from tunesmith.data.builtin_pools import CITIES, FIRST_NAMES, LAST_NAMES, TEMPLATES
from tunesmith.models.defaults import dequantized_dir, embedded_gguf_path


def replacement_words(tokenizer, proper_nouns: bool) -> list[str]:
    banned = {word.lower() for entity in (*FIRST_NAMES, *LAST_NAMES, *CITIES) for word in entity.split()}
    banned |= {word.lower() for shape in TEMPLATES for word in re.findall(r"[A-Za-z]+", shape)}
    vocabulary = tokenizer.get_vocab()
    shape = r"[A-Z][a-z]{3,11}" if proper_nouns else r"[A-Z][a-z]{4,11}"
    words = []
    for token in vocabulary:
        word = token[1:]
        if token.startswith("Ġ") and re.fullmatch(shape, word) and word.lower() not in banned \
                and len(tokenizer.encode(word, add_special_tokens=False)) >= 2 \
                and not (proper_nouns and "Ġ" + word.lower() in vocabulary):
            words.append(word)
    return sorted(words)


def main(city_share: float, first_share: float, seed: int, proper_nouns: bool = False) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(dequantized_dir(embedded_gguf_path())))
    words = replacement_words(tokenizer, proper_nouns)
    rng = random.Random(f"e1:{seed}")
    rng.sample(words, 20)  # the measured runs drew (and printed) 20 words first: kept so the rows are the same
    for row in builtin_task("train", 400, seed=seed):
        answer, sentence = json.loads(row["messages"][2]["content"]), row["messages"][1]["content"]
        draw = rng.random()
        if draw < city_share and sentence.count(answer["city"]) == 1:
            word = rng.choice(words)
            sentence, answer["city"] = sentence.replace(answer["city"], word), word
        elif draw < city_share + first_share and sentence.count(answer["name"]) == 1 and len(answer["name"].split()) == 2:
            name = f"{rng.choice(words)} {answer['name'].split()[1]}"
            sentence, answer["name"] = sentence.replace(answer["name"], name), name
        row["messages"][1]["content"], row["messages"][2]["content"] = sentence, format_answer(answer)
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["proper-nouns"])
