"""Loss masks on 59 real chat templates (tests/fixtures/chat_templates, sources in index.json), checked by construction.

Every conversation uses unique sentinel words, so the expected trained text of each assistant turn is known
without our code: what the template renders to open the turn beyond the generation prompt, the content, and
the template's own closing (EXPECTED below, read off each template by hand). One tokenizer serves all
templates: the embedded SmolLM2 tokenizer, with each template's marker strings (and reasoning tags) added as
special tokens, as the model families' own tokenizers have them. Rendering only; no model runs.
"""

import copy
import json
import re
import warnings
from pathlib import Path

import pytest

from tunesmith.templates import NOTE_NO_END_MARKER, NOTE_PROMPT_DIFFERS, render

FIXTURES = Path(__file__).parents[1] / "fixtures" / "chat_templates"
INDEX = json.loads((FIXTURES / "index.json").read_text())
MARKER = re.compile(r"<\|[^<>|\s]{1,48}\|>|<｜[^<>｜\s]{1,48}｜>|</?[A-Za-z][\w.:-]{0,48}>|\[/?[A-Z][A-Z_]{1,24}\]")

# name: (opening, closing mid-conversation, closing of the conversation's last turn, rewrites history).
# The embedded tokenizer's EOS is <|im_end|>, so templates that write eos_token close with it here. A leading
# " " is the space between a plain-text role label and the answer ("Assistant: A"): BPE glues it to the
# answer's first letter, and that token is trained because the model must produce it.
EXPECTED = {
    "cz-alpaca": ("", "<|im_end|>", "<|im_end|>", False),
    "cz-amberchat": (" ", "", "", False),
    "cz-chatml": ("", "<|im_end|>", "<|im_end|>", False),
    "cz-chatqa": (" ", "", "", False),
    "cz-falcon-instruct": (" ", "", "", False),
    "cz-gemma-it": ("", "<end_of_turn>", "<end_of_turn>", False),
    "cz-granite-3_0-instruct": ("", "<|end_of_text|>", "<|end_of_text|>", False),
    "cz-llama-2-chat": (" ", " <|im_end|>", " <|im_end|>", False),
    "cz-llama-3-instruct": ("", "<|eot_id|>", "<|eot_id|>", False),
    "cz-mistral-instruct": (" ", "<|im_end|>", "<|im_end|>", False),
    "cz-openchat-3_5": (" ", "<|end_of_turn|>", "<|end_of_turn|>", False),
    "cz-phi-3-small": ("", "<|end|>", "<|end|>", False),
    "cz-phi-3": ("", "<|end|>", "<|end|>", False),
    "cz-qwen2_5-instruct": ("", "<|im_end|>", "<|im_end|>", False),
    "cz-saiga": ("", "<|im_end|>", "<|im_end|>", False),
    "cz-solar-instruct": ("", "", "", False),
    "cz-vicuna": (" ", "<|im_end|>", "<|im_end|>", False),
    "cz-zephyr": ("", "<|im_end|>", "<|im_end|>", False),
    # DeepSeek-R1: the generation prompt adds "<think>\n", which the rendered turn lacks; the answer is whole
    "lcpp-deepseek-ai-deepseek-r1-distill-llama-8b": ("", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", False),
    "lcpp-deepseek-ai-deepseek-r1-distill-qwen-32b": ("", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", False),
    # GLM closes a turn with nothing: the next role tag stops it, so there is no end-of-turn marker to train
    # Apriel 1.6 writes its "<|end|>" only when another turn follows (not loop.last): mid turns train it,
    # the conversation's last turn has no closing to train
    "lcpp-apriel-1_6-15b-thinker-fixed": ("", "\n<|end|>", "", False),
    "lcpp-bytedance-seed-oss": ("", "<seed:eos>", "<seed:eos>", False),
    # Command-R7B appends its assistant header whatever add_generation_prompt says: never trained
    "lcpp-cohereforai-c4ai-command-r7b-12-2024-tool_use": (
        "<|START_RESPONSE|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", False),
    "lcpp-gigachat3-10b-a1_8b": ("", "<|message_sep|>", "<|message_sep|>", False),
    "lcpp-glm-4_6": ("<think></think>\n", "", "", False),
    "lcpp-google-gemma-2-2b-it": ("", "<end_of_turn>", "<end_of_turn>", False),
    "lcpp-huggingfacetb-smollm3-3b": ("", "<|im_end|>", "<|im_end|>", False),
    "lcpp-ibm-granite-granite-3_3-2b-instruct": ("", "<|end_of_text|>", "<|end_of_text|>", False),
    "lcpp-kimi-k2-instruct": ("", "<|im_end|>", "<|im_end|>", False),
    "lcpp-lfm2-8b-a1b": ("", "<|im_end|>", "<|im_end|>", False),
    "lcpp-meta-llama-llama-3_1-8b-instruct": ("", "<|eot_id|>", "<|eot_id|>", False),
    # Phi-3: the EOS comes once, at the end of the conversation: the last turn's, and no split
    "lcpp-microsoft-phi-3_5-mini-instruct": ("", "<|end|>", "<|end|>\n<|im_end|>", False),
    "lcpp-mistral-small-3_2-24b-instruct-2506": ("", "<|im_end|>", "<|im_end|>", False),
    "lcpp-mistralai-mistral-nemo-instruct-2407": ("", "<|im_end|>", "<|im_end|>", False),
    "lcpp-nvidia-nemotron-nano-v2": ("", "\n<SPECIAL_12>", "\n<SPECIAL_12>", True),
    # Qwen3: the last turn renders an empty think block that the generation prompt lacks: trained
    "lcpp-qwen-qwen3-0_6b": ("<think>\n\n</think>\n\n", "<|im_end|>", "<|im_end|>", True),
    "lcpp-qwen-qwq-32b": ("", "<|im_end|>", "<|im_end|>", False),
    "trl-cohere": ("", "<|END_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", False),
    "trl-cohere2": ("", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", False),
    "trl-deepseekv3": ("", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", False),
    "trl-gemma": ("", "<end_of_turn>", "<end_of_turn>", False),
    "trl-gemma3": ("", "<end_of_turn>", "<end_of_turn>", False),
    "trl-glm4moe": ("<think></think>\n", "", "", False),
    # gpt-oss closes a final answer with <|return|> but the same turn in history with <|end|>
    "trl-gptoss": ("<|channel|>final<|message|>", "<|end|>", "<|return|>", False),
    "trl-lfm2": ("", "<|im_end|>", "<|im_end|>", False),
    "trl-lfm2_2_5": ("", "<|im_end|>", "<|im_end|>", False),
    "trl-llama3": ("", "<|eot_id|>", "<|eot_id|>", False),
    "trl-llama3_1": ("", "<|eot_id|>", "<|eot_id|>", False),
    "trl-llama3_2": ("", "<|eot_id|>", "<|eot_id|>", False),
    # the generation prompt opens the think block ("<think>\n"), the turn closes it empty
    "trl-nemotron_3_nano": ("</think>", "<|im_end|>", "<|im_end|>", False),
    "trl-nemotron_3_super": ("</think>", "<|im_end|>", "<|im_end|>", False),
    "trl-phi3": ("", "<|end|>", "<|end|>\n<|im_end|>", False),
    "trl-phi3_5": ("", "<|end|>", "<|end|>\n<|im_end|>", False),
    "trl-qwen2_5": ("", "<|im_end|>", "<|im_end|>", False),
    "trl-qwen3": ("<think>\n\n</think>\n\n", "<|im_end|>", "<|im_end|>", True),
    "trl-qwen3_5_nothink": ("", "<|im_end|>", "<|im_end|>", True),
    "trl-qwen3_5_think": ("</think>\n\n", "<|im_end|>", "<|im_end|>", True),
    "trl-qwen3_6": ("</think>\n\n", "<|im_end|>", "<|im_end|>", True),
    "trl-qwen3_instruct_2507": ("", "<|im_end|>", "<|im_end|>", False),
}
# Cases a template refuses or renders otherwise, by name and why (never skipped silently).
NO_SYSTEM = {"trl-gemma": "raises on a system message", "lcpp-google-gemma-2-2b-it": "raises on a system message",
             "lcpp-mistralai-mistral-nemo-instruct-2407": "shows the system prompt only while the last user "
                                                          "message is last, so the training text lacks it"}
TOOL_CASE = {  # templates that render OpenAI-style tool calls and tool results; the rest raise or drop them
    "cz-qwen2_5-instruct", "lcpp-qwen-qwq-32b", "trl-qwen2_5", "trl-qwen3_instruct_2507", "trl-qwen3_5_nothink",
    "trl-lfm2_2_5", "trl-gptoss", "trl-glm4moe", "lcpp-glm-4_6", "trl-llama3_1", "trl-llama3_2",
    "lcpp-meta-llama-llama-3_1-8b-instruct", "trl-nemotron_3_nano", "trl-nemotron_3_super",
}

MULTI = [{"role": "user", "content": "Ualpha?"}, {"role": "assistant", "content": "Abravo"},
         {"role": "user", "content": "Ucharlie?"}, {"role": "assistant", "content": "Adelta"},
         {"role": "user", "content": "Uecho?"}, {"role": "assistant", "content": "Afoxtrot"}]
SYSTEM = [{"role": "system", "content": "Sgolf"}, {"role": "user", "content": "Uhotel?"},
          {"role": "assistant", "content": "Aindia"}]
# Marker strings of other families and HTML in an answer (control tokens are allowed at this level).
TRICKY = "<b>bold</b> Write <s>old</s> then <|end|> and <|endoftext|> tail."
MARKERS = [{"role": "user", "content": "Ujuliet?"}, {"role": "assistant", "content": TRICKY},
           {"role": "user", "content": "Ukilo?"}, {"role": "assistant", "content": "Alima"}]
CALL = [{"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
TOOL = [{"role": "user", "content": "Umike?"}, {"role": "assistant", "content": "", "tool_calls": CALL},
        {"role": "tool", "content": "Tnovember", "tool_call_id": "call12345", "name": "get_weather"},
        {"role": "assistant", "content": "Aoscar"}]


def test_corpus_covers_forty_real_templates_with_sources():
    assert len(EXPECTED) >= 40
    assert set(EXPECTED) | {n for n in INDEX if n.endswith("_training")} == set(INDEX)
    for name, source in INDEX.items():
        assert (FIXTURES / f"{name}.jinja").is_file()
        assert source["repo"] and source["path"].endswith(".jinja") and re.fullmatch(r"[0-9a-f]{40}", source["commit"])


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(base, name: str):
    """A copy of the embedded tokenizer with ``name``'s template and its markers as special tokens."""
    if name not in _TOKENIZERS:
        tok = copy.deepcopy(base)
        tok.chat_template = (FIXTURES / f"{name}.jinja").read_text()
        texts = []
        for conv in (MULTI, MARKERS[:1], SYSTEM, TOOL):
            try:
                texts.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
            except Exception:  # noqa: BLE001 - a case the template refuses is listed above
                continue
        markers = {m.group() for text in texts for m in MARKER.finditer(text.replace(TRICKY, ""))}
        tok.add_tokens(sorted(markers | {"<think>", "</think>"} - set(tok.get_vocab())), special_tokens=True)
        _TOKENIZERS[name] = tok
    return _TOKENIZERS[name]


def _runs(tok, rendered) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    runs, current = [], []
    for token, keep in zip(rendered.input_ids, rendered.trained):
        if keep:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def _render(tok, messages, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return render(tok, messages, **kwargs)


def _check(tok, messages, examples, answers, name, *, rewrites):
    opening, mid, last, _ = EXPECTED[name]
    if rewrites:  # one example per turn, each ending with its turn: the last-turn closing
        assert len(examples) == len(answers)
        expected = [[f"{opening}{answer}{last}"] for answer in answers]
    else:
        assert len(examples) == 1, "a spurious split"
        expected = [[f"{opening}{a}{mid if k < len(answers) - 1 else last}" for k, a in enumerate(answers)]]
        # the one example is exactly the template's own rendering of the whole conversation
        assert examples[0].text == tok.apply_chat_template(messages, tokenize=False)
    for rendered, runs in zip(examples, expected):
        assert _runs(tok, rendered) == runs
        assert rendered.input_ids == tok(rendered.text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_multi_turn_system_and_marker_content_train_exactly_each_answer_and_its_closing(tokenizer, name):
    tok = _tokenizer(tokenizer, name)
    rewrites = EXPECTED[name][3]
    _check(tok, MULTI, _render(tok, MULTI), ["Abravo", "Adelta", "Afoxtrot"], name, rewrites=rewrites)
    _check(tok, MARKERS, _render(tok, MARKERS), [TRICKY, "Alima"], name, rewrites=rewrites)
    if name not in NO_SYSTEM:
        _check(tok, SYSTEM, _render(tok, SYSTEM), ["Aindia"], name, rewrites=False)
    (last,) = _render(tok, MULTI, train_on="last")
    assert _runs(tok, last) == [f"{EXPECTED[name][0]}Afoxtrot{EXPECTED[name][2]}"]
    no_marker = not EXPECTED[name][2]
    assert (last.notes.get(NOTE_NO_END_MARKER) == 1) == no_marker


@pytest.mark.parametrize("name", sorted(NO_SYSTEM))
def test_listed_system_cases_are_what_the_template_does(tokenizer, name):
    tok = _tokenizer(tokenizer, name)
    if "raises" in NO_SYSTEM[name]:
        with pytest.raises(Exception, match="System role not supported"):
            _render(tok, SYSTEM)
    else:
        assert "Sgolf" not in tok.apply_chat_template(SYSTEM, tokenize=False)


@pytest.mark.parametrize("name", sorted(TOOL_CASE))
def test_tool_call_turns_train_the_call_and_never_the_tool_result(tokenizer, name):
    tok = _tokenizer(tokenizer, name)
    runs = [run for r in _render(tok, TOOL) for run in _runs(tok, r)]
    opening, mid, last, _ = EXPECTED[name]
    assert runs[-1] == f"{opening}Aoscar{last}"
    assert len(runs) == 2 and "get_weather" in runs[0] and "Oslo" in runs[0]
    assert not any("Tnovember" in run or "Umike" in run for run in runs)


@pytest.mark.parametrize("name", ["lcpp-deepseek-ai-deepseek-r1-distill-qwen-32b", "trl-cohere", "trl-phi3"])
def test_the_answer_is_never_cut_by_markers_or_a_generation_prompt_inside_the_turn(tokenizer, name):
    """The issue's cases: R1's "<think>\\n" prompt cut "<b>bold</b>" to "b>"; a Cohere-style template ended the
    span at "</s>" inside the answer; Phi-3's final EOS made every turn its own example."""
    tok = _tokenizer(tokenizer, name)
    (rendered,) = _render(tok, MARKERS)
    first = _runs(tok, rendered)[0]
    assert first.startswith("<b>bold</b>") and "then the tail" not in first and TRICKY in first
    assert (rendered.notes.get(NOTE_PROMPT_DIFFERS) == 2) == name.startswith("lcpp-deepseek")


TRAINING = sorted(n for n in INDEX if n.endswith("_training"))


@pytest.mark.parametrize("name", TRAINING)
def test_generation_marked_templates_agree_with_transformers_assistant_mask(tokenizer, name):
    """transformers' mask is what a template's {% generation %} blocks hold. Intended differences, all checked:
    their blocks also hold the end of the generation prompt (the role header, "<think>\\n" a think-mode
    prompt opens) and the newline after the end marker; we train neither, since the prompt is given at
    inference and what follows the marker is never generated."""
    tok = _tokenizer(tokenizer, name)
    conversation = MULTI[:4] if name == "trl-gemma_training" else SYSTEM[:1] + MULTI[:4]  # Gemma: no system role
    out = tok.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (ours,) = _render(tok, conversation)
    theirs = _runs(tok, type(ours)(input_ids=list(out["input_ids"]), trained=[bool(m) for m in out["assistant_masks"]],
                                   text="", offsets=[]))
    assert list(out["input_ids"]) == ours.input_ids
    for k, (run, mine) in enumerate(zip(theirs, _runs(tok, ours), strict=True)):
        context = conversation[: conversation.index(MULTI[2 * k]) + 1]
        prompt = tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        plain = tok.apply_chat_template(context, tokenize=False)
        generation_prompt = prompt[next((i for i, (a, b) in enumerate(zip(prompt, plain)) if a != b), len(plain)):]
        head = run.rstrip()[: len(run.rstrip()) - len(mine)]
        assert run.rstrip().endswith(mine) and run[len(head) + len(mine):].strip() == ""
        assert head.strip() in generation_prompt, f"{head!r} is not part of the generation prompt"
