"""Chat templates and assistant masks: golden renders, invariants, history rewriting, reasoning flags."""

import json
import os
from pathlib import Path

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.mask_view import mask_view
from tunesmith.templates import (BUILTIN_TEMPLATES, render, render_prompt, stop_token_ids,
                                 use_template)

GOLDEN = Path(__file__).parent / "golden" / "templates.json"
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 🙂"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]

# A reasoning template of our own that, like SmolLM3's, drops the <think> blocks of turns before the last
# user message and reads
# /think and /no_think from the system prompt.
REWRITING_TEMPLATE = (
    "{%- set ns = namespace(last=-1, think=true) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- if messages and messages[0].role == 'system' and '/no_think' in messages[0].content %}{% set ns.think = false %}{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}"
    "{%- if loop.index0 < ns.last and '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip() %}{% endif -%}"
    "{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if not ns.think %}{{ '<think>\n\n</think>\n' }}{% endif %}{% endif -%}"
)


@pytest.fixture()
def tok(tokenizer):
    """A per-test copy of the embedded tokenizer's template, so tests may switch templates."""
    own = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = own


def _golden_case(tok, name):
    use_template(tok, name)
    (rendered,) = render(tok, CONVERSATION)
    return {"input_ids": rendered.input_ids, "trained": [int(x) for x in rendered.trained]}


@pytest.mark.parametrize("name", [None, *BUILTIN_TEMPLATES])
def test_golden_render(tok, name):
    key = name or "embedded"
    case = _golden_case(tok, name)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("TUNESMITH_REGEN_GOLDEN"):
        golden[key] = case
        GOLDEN.write_text(json.dumps(golden, indent=None, separators=(",", ":")) + "\n")
    assert case == golden[key]


@pytest.mark.parametrize("name,eot", [(None, "<|im_end|>"), ("chatml", "<|im_end|>"), ("zephyr", "</s>"),
                                      ("llama3", "<|eot_id|>")])
def test_trained_text_is_each_assistant_turn_and_its_end_marker(tok, name, eot):
    use_template(tok, name)
    (r,) = render(tok, CONVERSATION)
    trained_text = "".join(r.text[s:e] for (s, e), keep in zip(r.offsets, r.trained) if keep)
    # llama3's markers are not special tokens in this tokenizer, so BPE may glue one more character on.
    assert trained_text.startswith(f"Hello! 🙂{eot}")
    assert f"4{eot}" in trained_text[len(f"Hello! 🙂{eot}"):]
    assert len(trained_text) <= len(f"Hello! 🙂{eot}4{eot}") + 1
    assert r.labels.count(-100) == len(r.input_ids) - r.num_trained


def test_golden_mask_view_plain(tok):
    (r,) = render(tok, CONVERSATION)
    assert mask_view(r, color=False) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n[[Hello! 🙂<|im_end|>]]\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n[[4<|im_end|>]]\n\n-- 6 of 43 tokens trained in 2 span(s)"
    )
    assert "\x1b[30;42mHello! 🙂<|im_end|>\x1b[0m" in mask_view(r, color=True)


def test_last_turn_only_and_first_trained(tok):
    (last,) = render(tok, CONVERSATION, train_on="last")
    assert last.num_trained == 2  # "4" and <|im_end|>
    (from_prompt,) = render(tok, CONVERSATION, first_trained=3)
    assert from_prompt.trained == last.trained


def test_prompt_tokens_match_inference_prompt(tok):
    (r,) = render(tok, CONVERSATION)
    first_trained = r.trained.index(True)
    assert r.input_ids[:first_trained] == render_prompt(tok, CONVERSATION[:2])


def test_embedded_template_adds_default_system_prompt_untrained(tok):
    (r,) = render(tok, CONVERSATION[1:])
    assert "You are a helpful AI assistant named SmolLM" in r.text
    assert r.num_trained == 6


def test_history_rewriting_template_gives_one_example_per_turn(tok):
    use_template(tok, REWRITING_TEMPLATE)
    messages = [
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "<think>hmm</think>A"},
        {"role": "user", "content": "b?"},
        {"role": "assistant", "content": "<think>ok</think>B"},
    ]
    first, second = render(tok, messages)
    assert first.text.endswith("<think>hmm</think>A<|im_end|>\n")
    # The second example's history is what the template shows at inference: no earlier reasoning.
    assert "hmm" not in second.text
    assert second.input_ids[: second.trained.index(True)] == render_prompt(tok, messages[:3])
    for r, answer in ((first, "<think>hmm</think>A"), (second, "<think>ok</think>B")):
        trained = "".join(r.text[s:e] for (s, e), keep in zip(r.offsets, r.trained) if keep)
        assert trained == answer + "<|im_end|>"


def test_reasoning_flag_goes_to_system_prompt_and_generation_prompt_stays_untrained(tok):
    use_template(tok, REWRITING_TEMPLATE)
    messages = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A"}]
    (r,) = render(tok, messages, reasoning="off")
    assert r.text.startswith("<|im_start|>system\n/no_think<|im_end|>")
    trained = "".join(r.text[s:e] for (s, e), keep in zip(r.offsets, r.trained) if keep)
    assert trained == "A<|im_end|>"
    assert tok.decode(render_prompt(tok, messages[:1], reasoning="on")).startswith("<|im_start|>system\n/think")


def test_reasoning_kwarg_style_template(tok):
    use_template(tok, "{{ 'think' if enable_thinking else 'nothink' }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tok.decode(render_prompt(tok, [{"role": "user", "content": "x"}], reasoning="off")) == "nothinkx"


def test_reasoning_on_template_without_it_warns(tok):
    with pytest.warns(UserWarning, match="no reasoning mode"):
        render(tok, CONVERSATION, reasoning="on")


def test_template_errors(tok):
    with pytest.raises(TunesmithError, match="unknown template 'vicuna'; choose one of: chatml, zephyr, llama3"):
        use_template(tok, "vicuna")
    tok.chat_template = None
    with pytest.raises(TunesmithError, match="has no chat template"):
        use_template(tok, None)


def test_stop_tokens(tok):
    assert stop_token_ids(tok) == [2]
    use_template(tok, "zephyr")
    assert stop_token_ids(tok) == [2]  # </s> is several tokens here; EOS still stops


def test_mask_view_shows_a_character_split_across_tokens_once(tokenizer):
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ēriks Ōsaka"}]
    (rendered,) = render(tokenizer, messages)
    assert any(a == b for a, b in zip(rendered.offsets, rendered.offsets[1:]))  # the split the view must handle
    view = mask_view(rendered, color=False)
    body = view.rsplit("\n-- ", 1)[0]
    assert body == rendered.text.replace("Ēriks Ōsaka<|im_end|>", "[[Ēriks Ōsaka<|im_end|>]]")
