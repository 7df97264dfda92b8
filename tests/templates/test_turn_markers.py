"""Where a closing ends and the next turn's opener begins, on rendered strings (no tokenizer: markers by shape)."""

from tunesmith.turn_markers import before_opener, mid_closing, openers

PROBE = "\ue000probe\ue001"


def test_openers_are_leading_markers_generation_prompt_markers_and_role_markers():
    chatml = f"<|im_start|>user\n{PROBE}<|im_end|>\n"
    assert openers(chatml, chatml + "<|im_start|>assistant\n", PROBE, set()) == {"<|im_start|>"}
    # an empty system block ahead of the user turn: its closer leads the text but opens nothing
    nemotron = f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{PROBE}<|im_end|>\n"
    assert openers(nemotron, nemotron + "<|im_start|>assistant\n<think>\n", PROBE, set()) == {"<|im_start|>"}
    # a template that always appends the assistant header (no generation prompt to read it from)
    command_r = (f"<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Preamble<|END_OF_TURN_TOKEN|>"
                 f"<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{PROBE}<|END_OF_TURN_TOKEN|>"
                 f"<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    assert openers(command_r, command_r, PROBE, set()) == {
        "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"}


def test_a_closing_stops_before_an_opener_but_keeps_its_first_marker():
    opening = frozenset({"<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|endoftext|>"})
    tail = "<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    assert before_opener(tail, opening, set()) == "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
    # a template whose EOS string is also its BOS closes with it
    assert before_opener("<|endoftext|>\n<|endoftext|>user", opening, set()) == "<|endoftext|>\n"


def test_a_closing_written_only_when_another_turn_follows():
    opening = frozenset({"<|begin_user|>", "<|begin_assistant|>"})
    assert mid_closing("", "\n<|end|>\n<|begin_user|>\nnext", set(), opening) == "\n<|end|>"
    # without a known opener after it, nothing tells the closing from the next turn's header: none is trained
    assert mid_closing("", "\n<|end|>\n<|user_header|>\nnext", set(), frozenset()) == ""
    # what the template emits whatever follows still wins (ChatML)
    assert mid_closing("<|im_end|>\n", "<|im_end|>\n<|im_start|>user\nnext", set(),
                       frozenset({"<|im_start|>"})) == "<|im_end|>"
