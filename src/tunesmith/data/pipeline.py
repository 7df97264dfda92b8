"""From a dataset source string to tokenized training sequences, refusing a dataset with nothing to train."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from tunesmith.data.formats import NormalisedData, normalise
from tunesmith.data.sources import load_rows
from tunesmith.data.tokenize import TokenizedData, TokenizeOptions, tokenize_examples
from tunesmith.errors import TunesmithError
from tunesmith.templates import IGNORE_INDEX


@dataclass
class PreparedData:
    name: str
    rows: int
    normalised: NormalisedData
    tokenized: TokenizedData

    @property
    def examples(self) -> list[dict]:
        return self.tokenized.examples

    def check_token_budget(self, token_budget: int) -> None:
        """Refuse, before any model loads, a packing budget that one example cannot fit in.

        Packing never cuts an example (``data.max_length`` and ``data.overlength`` decide that when
        tokenizing), so an example longer than a packed row would stop training midway.
        """
        lengths = [len(example["input_ids"]) for example in self.examples]
        for example, length in zip(self.examples, lengths):
            if length > token_budget:
                raise TunesmithError(
                    f"{self.name}: {self.normalised.unit} {example['row']} is {length} tokens long, more than "
                    f"data.token_budget={token_budget} (the tokens of one packed row); raise data.token_budget "
                    f"to at least {max(lengths)}, or lower data.max_length to {token_budget} to truncate longer "
                    "examples")

    def drops(self) -> dict:
        """Rows dropped at validation and at tokenization, grouped by reason (most common first).

        ``unit`` says what the numbers count: ``"line"`` (the 1-based line in a JSONL or CSV file) or
        ``"row"``. ``first`` holds up to five of a reason's numbers, ascending. A row is counted once
        per reason even when a history-rewriting template split it into several dropped sequences.
        """
        dropped = list(dict.fromkeys(self.normalised.dropped + self.tokenized.dropped))
        numbers: dict[str, list[int]] = {}
        for number, reason in dropped:
            numbers.setdefault(reason, []).append(number)
        ordered = sorted(numbers.items(), key=lambda item: -len(item[1]))
        return {"count": len(dropped), "unit": self.normalised.unit,
                "by_reason": {reason: {"count": len(found), "first": sorted(found)[:5]} for reason, found in ordered}}


def prepare(source: str, tokenizer, options: TokenizeOptions, *, fmt: str | None = None,
            invalid_rows: str = "error", split: str | None = None,
            require_trained: bool = True, sample: int | None = None, seed: int = 0) -> PreparedData:
    """Load, validate, normalise and tokenize ``source``.

    With ``require_trained`` a dataset whose rows hold no trained token at all is refused here,
    before any model is loaded or trained. ``sample`` keeps a seeded random subset of that many valid
    rows (in source order, with their source row numbers) before tokenization.
    """
    rows, name = load_rows(source, split=split)
    normalised = normalise(rows, fmt, policy=invalid_rows, name=name)
    if sample is not None and sample < len(normalised.examples):
        keep = sorted(random.Random(seed).sample(range(len(normalised.examples)), sample))
        normalised.examples = [normalised.examples[i] for i in keep]
    tokenized = tokenize_examples(tokenizer, normalised.examples, options, name=name, invalid_rows=invalid_rows,
                                  unit=normalised.unit)
    if require_trained and tokenized.trained_tokens == 0:
        raise TunesmithError(f"{name}: no row has a trained token after validation and tokenization "
                             f"({len(normalised.dropped) + len(tokenized.dropped)} rows dropped); "
                             "check the format, the template and max_length")
    return PreparedData(name=name, rows=len(rows), normalised=normalised, tokenized=tokenized)


def _lengths(example: dict) -> list[int]:
    if "chosen" in example:
        return [len(example["chosen"]["input_ids"]), len(example["rejected"]["input_ids"])]
    return [len(example["input_ids"])]


def _histogram(lengths: list[int], bins: int = 8) -> list[dict]:
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((n - low) // width for n in lengths)
    return [{"from": low + b * width, "to": low + (b + 1) * width - 1, "count": counts.get(b, 0)}
            for b in range(-(-(high - low + 1) // width))]


def inspection(prepared: PreparedData) -> dict:
    """A machine-readable summary: formats, drops by reason, lengths, truncation and trained tokens."""
    examples = prepared.examples
    lengths = [n for ex in examples for n in _lengths(ex)]
    trained = [sum(1 for label in (ex.get("labels") or []) if label != IGNORE_INDEX) for ex in examples]
    drops = prepared.drops()
    kinds = Counter(ex.kind for ex in prepared.normalised.examples)
    return {
        "dataset": prepared.name,
        "format": prepared.normalised.format,
        "rows": prepared.rows,
        "rows_by_kind": dict(sorted(kinds.items())),
        "valid_rows": len({ex["row"] for ex in examples}),  # rows that passed validation and tokenization
        "dropped": drops["count"],
        "dropped_unit": drops["unit"],
        "dropped_by_reason": drops["by_reason"],
        "dropped_rows": sorted({number for number, _ in prepared.normalised.dropped + prepared.tokenized.dropped})[:50],
        "sequences": len(examples),
        "truncated": prepared.tokenized.truncated,
        "tokens": sum(lengths),
        "trained_tokens": prepared.tokenized.trained_tokens,
        "length": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                   "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0},
        "trained_per_sequence": {"min": min(trained, default=0), "max": max(trained, default=0)},
        "length_histogram": _histogram(lengths),
    }


def format_inspection(report: dict) -> str:
    lines = [
        f"dataset       {report['dataset']}",
        f"format        {report['format']}  ({', '.join(f'{k}: {v}' for k, v in report['rows_by_kind'].items())})",
        f"rows          {report['rows']}  valid {report['valid_rows']}  dropped {report['dropped']}",
    ]
    unit = report["dropped_unit"]
    lines += [f"  dropped     {drop['count']} × {reason} ({unit}{'s' if drop['count'] > 1 else ''} "
              f"{', '.join(map(str, drop['first']))}"
              f"{', …' if drop['count'] > len(drop['first']) else ''})"
              for reason, drop in report["dropped_by_reason"].items()]
    length = report["length"]
    lines += [
        f"sequences     {report['sequences']}  truncated {report['truncated']}",
        f"tokens        {report['tokens']}  trained {report['trained_tokens']}",
        f"length        min {length['min']}  mean {length['mean']}  max {length['max']}",
        "histogram",
    ]
    peak = max((b["count"] for b in report["length_histogram"]), default=1) or 1
    for b in report["length_histogram"]:
        bar = "#" * round(40 * b["count"] / peak)
        lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>6} {bar}")
    return "\n".join(lines)
