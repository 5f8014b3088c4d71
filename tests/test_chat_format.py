"""The Llama 2 chat prompt: exact tokens, role-order validation and special-tag detection."""

from __future__ import annotations

import re

import pytest
from sentencepiece import SentencePieceProcessor

from helpers import TOKENIZER, hf_llama_tokenizer
from llama import ChatFormat, Tokenizer
from llama.families.chat_format import SPECIAL_TAGS, UNSAFE_ERROR, has_special_tags, validate_dialog

BOS, EOS = 1, 2
# Derived piece by piece (checked in test_tag_ids_spell_the_tags): "▁[" "INST" "]" and "▁[" "/" "INST" "]".
INST = [518, 25580, 29962]
E_INST = [518, 29914, 25580, 29962]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def fmt(tok) -> ChatFormat:
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def sp() -> SentencePieceProcessor:
    """SentencePiece itself, without our wrapper: a second opinion on tag ids and the source of the piece table."""
    return SentencePieceProcessor(model_file=str(TOKENIZER))


# --- the tags ------------------------------------------------------------------------------------------------


def test_tag_ids_spell_the_tags(sp):
    assert [sp.id_to_piece(i) for i in INST] == ["\u2581[", "INST", "]"]
    assert [sp.id_to_piece(i) for i in E_INST] == ["\u2581[", "/", "INST", "]"]
    assert sp.encode("[INST]") == INST
    assert sp.encode("[/INST]") == E_INST
    assert (sp.bos_id(), sp.eos_id()) == (BOS, EOS)


# --- exact prompt tokens -------------------------------------------------------------------------------------


def test_single_user_turn(fmt, tok):
    dialog = [user("What is the capital of France?")]
    assert fmt.encode_dialog_prompt(dialog) == tok.encode("[INST] What is the capital of France? [/INST]",
                                                          bos=True, eos=False)


def test_single_user_turn_hard_coded(fmt, sp):
    """BOS "▁[" "INST" "]" "▁Hello" "▁[" "/" "INST" "]": no EOS, the model answers next."""
    tokens = fmt.encode_dialog_prompt([user("Hello")])
    assert tokens == [BOS] + INST + [15043] + E_INST
    assert sp.id_to_piece(15043) == "\u2581Hello"


def test_system_prompt(fmt, tok):
    dialog = [system("Always answer with Haiku"), user("I am going to Paris, what should I see?")]
    text = "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\nI am going to Paris, what should I see? [/INST]"
    assert fmt.encode_dialog_prompt(dialog) == tok.encode(text, bos=True, eos=False)


def test_multi_turn(fmt, tok):
    dialog = [user("u1"), assistant("a1"), user("u2"), assistant("a2"), user("u3")]
    expected = (tok.encode("[INST] u1 [/INST] a1 ", bos=True, eos=True)
                + tok.encode("[INST] u2 [/INST] a2 ", bos=True, eos=True)
                + tok.encode("[INST] u3 [/INST]", bos=True, eos=False))
    assert fmt.encode_dialog_prompt(dialog) == expected


def test_multi_turn_with_system(fmt, tok):
    dialog = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye")]
    expected = (tok.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", bos=True, eos=True)
                + tok.encode("[INST] Bye [/INST]", bos=True, eos=False))
    assert fmt.encode_dialog_prompt(dialog) == expected


# "What is 2+2?" / "4." / "And times 3?": ids written out by hand, then checked piece by piece below.
MULTI_TURN_DIALOG = [user("What is 2+2?"), assistant("4."), user("And times 3?")]
MULTI_TURN_IDS = (
    [BOS] + INST + [1724, 338, 29871, 29906, 29974, 29906, 29973] + E_INST + [29871, 29946, 29889, 29871, EOS]
    + [BOS] + INST + [1126, 3064, 29871, 29941, 29973] + E_INST
)
MULTI_TURN_PIECES = (
    ["<s>", "\u2581[", "INST", "]", "\u2581What", "\u2581is", "\u2581", "2", "+", "2", "?",
     "\u2581[", "/", "INST", "]", "\u2581", "4", ".", "\u2581", "</s>",
     "<s>", "\u2581[", "INST", "]", "\u2581And", "\u2581times", "\u2581", "3", "?", "\u2581[", "/", "INST", "]"]
)


def test_multi_turn_hard_coded(fmt, sp):
    assert [sp.id_to_piece(i) for i in MULTI_TURN_IDS] == MULTI_TURN_PIECES
    assert fmt.encode_dialog_prompt(MULTI_TURN_DIALOG) == MULTI_TURN_IDS


SYSTEM_DIALOG = [system("Be brief."), user("Hi")]
SYSTEM_IDS = ([BOS] + INST + [3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13, 29966, 829, 14816, 29903, 6778,
                              13, 13, 18567] + E_INST)
SYSTEM_PIECES = (["<s>", "\u2581[", "INST", "]", "\u2581<<", "SY", "S", ">>", "<0x0A>", "Be", "\u2581brief", ".",
                  "<0x0A>", "<", "</", "SY", "S", ">>", "<0x0A>", "<0x0A>", "Hi", "\u2581[", "/", "INST", "]"])


def test_system_prompt_hard_coded(fmt, sp):
    assert [sp.id_to_piece(i) for i in SYSTEM_IDS] == SYSTEM_PIECES
    assert fmt.encode_dialog_prompt(SYSTEM_DIALOG) == SYSTEM_IDS


def test_contents_are_stripped(fmt):
    padded = [user("\n\tHi  "), assistant("  Hello!  \n"), user("   Bye\n\n")]
    clean = [user("Hi"), assistant("Hello!"), user("Bye")]
    assert fmt.encode_dialog_prompt(padded) == fmt.encode_dialog_prompt(clean)
    assert fmt.encode_dialog_prompt([user("  Hello \n")]) == [BOS] + INST + [15043] + E_INST


def meta_chat_completion_text(dialog):
    """Meta's llama/generation.py chat_completion (Llama 2 release), transcribed: the system message is joined to
    the first user message (B_SYS + system + E_SYS + user) and only the joined text is stripped."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n"
                   + dialog[1]["content"]}] + dialog[2:]
    turns = [(f"[INST] {p['content'].strip()} [/INST] {a['content'].strip()} ", True)
             for p, a in zip(dialog[::2], dialog[1::2])]
    return turns + [(f"[INST] {dialog[-1]['content'].strip()} [/INST]", False)]


@pytest.mark.parametrize("dialog", [
    [system(" Be brief.\n"), user(" Hi")],  # the example: the system's inner spaces stay
    [system("  Be brief.\n"), user("\n\tHi  "), assistant("  Hello!  \n"), user("   Bye\n\n")],
    [system("\n"), user("x")], [system("a"), user("\n\n b")]])
def test_system_and_first_user_message_are_stripped_joined(fmt, tok, dialog):
    expected = [t for text, eos in meta_chat_completion_text(dialog) for t in tok.encode(text, bos=True, eos=eos)]
    assert fmt.encode_dialog_prompt(dialog) == expected
    if dialog[1]["content"] == " Hi":
        assert tok.decode(expected) == "[INST] <<SYS>>\n Be brief.\n\n<</SYS>>\n\n Hi [/INST]"


def test_bos_and_eos_only_where_the_format_puts_them(fmt):
    """One BOS per exchange and one EOS per answer; "<s>"/"</s>" typed in a message stay text."""
    dialog = [user("a </s><s> b"), assistant("<s>c</s>"), user("d")]
    tokens = fmt.encode_dialog_prompt(dialog)
    assert tokens.count(BOS) == 2 and tokens.count(EOS) == 1
    eos_at = tokens.index(EOS)
    assert tokens[0] == BOS and tokens[eos_at + 1] == BOS
    assert tokens[-len(E_INST):] == E_INST


def test_does_not_modify_the_dialog(fmt):
    dialog = [system(" s "), user(" u ")]
    snapshot = [dict(m) for m in dialog]
    fmt.encode_dialog_prompt(dialog)
    assert dialog == snapshot


# --- cross-check with transformers' rendering of the Llama 2 chat template ----------------------------------

# The chat template of Meta's Llama-2-*-chat-hf tokenizer_config.json, written out here.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def hf(sp):
    """transformers.LlamaTokenizer over the fixture's vocabulary, set up as in tests/test_tokenizer.py's
    `reference` fixture (score-ranked merges, the legacy "prepend ▁, spaces to ▁" normalizer). Its BPE is Hugging
    Face's Rust implementation, so it does not share our wrapper's or SentencePiece's encoder."""
    return hf_llama_tokenizer(sp)


TEMPLATE_DIALOGS = [
    [user("Hello")],
    [system("Always answer with Haiku"), user("I am going to Paris, what should I see?")],
    MULTI_TURN_DIALOG,
    [system("Be brief."), user("Hi"), assistant("Hello!"), user("\u65e5\u672c\u8a9e\u3067 \U0001F600")],
    [user("Write  two\nlines"), assistant("Line one\nLine two"), user("Again, with tabs:\t"),
     assistant("\tok"), user("Thanks!")],
    [user("Hello  "), assistant("  Hi there."), user("\n\nHow are you? ")],
    [system(" Be brief.\n"), user(" Hi")],
    [system("  padded  "), user("\tfirst "), assistant(" a "), user(" b ")],
]


@pytest.mark.parametrize("dialog", TEMPLATE_DIALOGS, ids=[f"dialog{i}" for i in range(len(TEMPLATE_DIALOGS))])
def test_matches_transformers_chat_template(fmt, hf, dialog):
    text = hf.apply_chat_template(dialog, tokenize=False, chat_template=LLAMA2_CHAT_TEMPLATE)
    assert text.startswith("<s>[INST]")
    expected = hf.encode(text, add_special_tokens=False)  # here "<s>"/"</s>" are the template's BOS/EOS
    assert fmt.encode_dialog_prompt(dialog) == expected


def test_template_render_of_hard_coded_prompt(hf):
    text = hf.apply_chat_template(MULTI_TURN_DIALOG, tokenize=False, chat_template=LLAMA2_CHAT_TEMPLATE)
    assert text == "<s>[INST] What is 2+2? [/INST] 4. </s><s>[INST] And times 3? [/INST]"
    assert hf.encode(text, add_special_tokens=False) == MULTI_TURN_IDS


# --- role order and message shape ----------------------------------------------------------------------------


def _position_named(message: str, position: int) -> bool:
    return re.search(rf"\bmessage {position}\b", message) is not None


@pytest.mark.parametrize("dialog, position, names", [
    ([user("hi"), system("late system")], 1, "'system'"),
    ([user("a"), assistant("b"), system("c"), assistant("d"), user("e")], 2, "'system'"),
    ([system("s"), system("s again"), user("u")], 1, "'system'"),
    ([user("one"), user("two")], 1, "'user'"),
    ([system("s"), user("one"), user("two")], 2, "'user'"),
    ([assistant("I speak first"), user("hi")], 0, "'assistant'"),
    ([system("s"), assistant("a"), user("u")], 1, "'assistant'"),
    ([user("u"), assistant("a"), assistant("again"), user("u")], 2, "'assistant'"),
    ([user("u"), {"role": "admin", "content": "x"}, user("u")], 1, "'admin'"),
], ids=["system-second", "system-middle", "two-systems", "two-users", "two-users-after-system", "assistant-first",
        "assistant-after-system", "two-assistants", "unknown-role"])
def test_role_order_errors_name_the_position(fmt, dialog, position, names):
    with pytest.raises(ValueError) as err:
        fmt.encode_dialog_prompt(dialog)
    assert _position_named(str(err.value), position), str(err.value)
    assert names in str(err.value)


@pytest.mark.parametrize("dialog, position", [
    ([user("u"), assistant("a")], 1),
    ([system("s"), user("u"), assistant("a")], 2),
    ([system("only a system prompt")], 0),
], ids=["ends-with-assistant", "system-then-ends-with-assistant", "system-only"])
def test_must_end_with_user(fmt, dialog, position):
    with pytest.raises(ValueError) as err:
        fmt.encode_dialog_prompt(dialog)
    assert "user" in str(err.value)
    assert _position_named(str(err.value), position), str(err.value)


@pytest.mark.parametrize("dialog", [[], (), None, "hello", {"role": "user", "content": "hi"}],
                         ids=["empty-list", "empty-tuple", "none", "str", "bare-message"])
def test_empty_or_non_list_dialog(fmt, dialog):
    with pytest.raises(ValueError) as err:
        fmt.encode_dialog_prompt(dialog)
    assert repr(dialog) in str(err.value)


@pytest.mark.parametrize("bad", [
    "just a string",
    {"role": "user"},
    {"content": "no role"},
    {"role": "user", "content": None},
    {"role": "user", "content": 42},
    {"role": 1, "content": "x"},
    ["user", "hi"],
], ids=["str", "no-content", "no-role", "content-none", "content-int", "role-int", "list"])
def test_bad_message_types_name_the_position(fmt, bad):
    dialog = [user("first"), assistant("second"), bad]
    with pytest.raises(ValueError) as err:
        fmt.encode_dialog_prompt(dialog)
    assert _position_named(str(err.value), 2), str(err.value)
    assert repr(bad) in str(err.value)


def test_validate_dialog_names_the_dialog_index():
    with pytest.raises(ValueError) as err:
        validate_dialog([user("a"), user("b")], index=7)
    assert "dialog 7" in str(err.value) and _position_named(str(err.value), 1)


@pytest.mark.parametrize("dialog", [
    [user("hi")],
    [system("s"), user("u")],
    [user("u"), assistant("a"), user("u")],
    [system("s"), user("u"), assistant("a"), user("u")],
])
def test_valid_dialogs_pass_validation(dialog):
    validate_dialog(dialog)
    validate_dialog(tuple(dialog), index=0)


# --- special tags --------------------------------------------------------------------------------------------


def test_special_tags_are_the_four_prompt_markers():
    assert sorted(SPECIAL_TAGS) == sorted(["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("where", ["system", "user", "assistant", "last-user"])
def test_has_special_tags_finds_each_tag_in_each_role(tag, where):
    contents = {"system": "s", "user": "u", "assistant": "a", "last-user": "v"}
    contents[where] = f"please ignore that {tag} and go on"
    dialog = [system(contents["system"]), user(contents["user"]), assistant(contents["assistant"]),
              user(contents["last-user"])]
    assert has_special_tags(dialog)


@pytest.mark.parametrize("content", [
    "plain text", "[INST", "INST]", "<SYS>", "<s>[/INS T]</s>", "[ /INST]", "<< SYS >>",
])
def test_has_special_tags_ignores_near_misses(content):
    assert not has_special_tags([system("s"), user(content)])
