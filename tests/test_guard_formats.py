"""Llama Guard 1/2/3 and Code Llama 70B Instruct prompts against Meta's published references, token for token.

References (tests/fixtures/chat-templates/, transcribed, see tests/fixtures/README.md): the chat templates of
meta-llama/LlamaGuard-7b, Meta-Llama-Guard-2-8B, Llama-Guard-3-8B and Llama-Guard-3-1B, rendered here by
transformers' own jinja renderer (not ours); and the token ids Code Llama 70B Instruct's model card writes out.
Token ids come from independent encoders: SentencePiece itself, and tiktoken over the Llama 3 vocabulary.
"""

from __future__ import annotations

import re

import pytest

from helpers import TOKENIZER, codellama_tokenizer
from llama import Tokenizer
from llama.families import codellama, llamaguard

pytest.importorskip("tiktoken")
chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
TEMPLATES = TOKENIZER.parent / "chat-templates"

CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread? "}],
    [{"role": "user", "content": "  How do I bake bread?"}, {"role": "assistant", "content": "Mix flour and water.\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "日本語 😀"}],
]


def render(template: str, messages, **kwargs) -> str:
    """transformers' rendering (the environment apply_chat_template uses)."""
    text = (TEMPLATES / template).read_text()
    rendered, _ = chat_template_utils.render_jinja_template([messages], chat_template=text, **kwargs)
    return rendered[0]


@pytest.fixture(scope="module")
def sp():
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(TOKENIZER))


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_guard1_is_the_published_template(tok2, sp, conversation):
    """BOS, then the LlamaGuard-7b template's text: the six published categories verbatim."""
    text = render("meta-llama-LlamaGuard-7b.jinja", conversation)
    assert llamaguard.V1.encode_prompt(tok2, conversation) == [sp.bos_id()] + sp.encode(text)


def test_guard1_published_categories_passed_back_render_the_same(tok2):
    dialog = CONVERSATIONS[1]
    given = [(c.name, c.description) for c in llamaguard.V1_CATEGORIES]
    assert llamaguard.V1.encode_prompt(tok2, dialog, given) == llamaguard.V1.encode_prompt(tok2, dialog)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_guard2_is_the_published_template(tok3, ref3, conversation):
    text = render("meta-llama-Meta-Llama-Guard-2-8B.jinja", conversation)
    assert text.count("\nS") == 11
    assert llamaguard.V2.encode_prompt(tok3, conversation) == [128000] + ref3.encode(text)


def _body(rendered: str) -> str:
    """The guard task in a Llama Guard 3 template's rendering: the text of its one user message."""
    match = re.fullmatch(r" ?<\|begin_of_text\|><\|start_header_id\|>user<\|end_header_id\|>\n\n(.*)"
                         r"<\|eot_id\|><\|start_header_id\|>assistant<\|end_header_id\|>", rendered, re.S)
    assert match, rendered[-200:]
    return match.group(1)


@pytest.mark.parametrize("small", [False, True], ids=["8B", "1B"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_guard3_is_the_published_task_in_a_llama3_user_message(tok3, ref3, conversation, small):
    """Meta's format (llama-stack): the task as one Llama 3 user message, stripped like every message. The HF
    templates hold the same task text (8B: S1-S14, 1B: S1-S13); they differ only around it (a leading space, no
    blank line after the last header, the 1B's space before <|eot_id|>)."""
    guard = llamaguard.V3_1B if small else llamaguard.V3
    if small:
        parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in conversation]
        body = _body(render("meta-llama-Llama-Guard-3-1B.jinja", parts, excluded_category_keys=[]))
    else:
        body = _body(render("meta-llama-Llama-Guard-3-8B.jinja", conversation))
    assert ("S14: Code Interpreter Abuse." in body) is not small and "S13: Elections." in body
    assert guard.prompt_text(conversation) == body.strip()
    expected = ref3.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + body.strip() +
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", allowed_special="all")
    assert guard.encode_prompt(tok3, conversation) == expected


def test_guard3_excluded_categories_keep_their_codes():
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = _body(render("meta-llama-Llama-Guard-3-1B.jinja", parts, excluded_category_keys=["S2", "S11"]))
    text = llamaguard.V3_1B.prompt_text([{"role": "user", "content": "hi"}], excluded=["S2", "S11"])
    assert text == body.strip() and "S2:" not in text and "S12: Sexual Content." in text
    with pytest.raises(ValueError, match="'S14'"):
        llamaguard.V3_1B.prompt_text([{"role": "user", "content": "hi"}], excluded=["S14"])


def test_guard_answers_name_the_published_categories():
    verdict = llamaguard.V2.parse("unsafe\nS1,S9")
    assert verdict.names == ["Violent Crimes", "Hate"]
    assert llamaguard.V1.parse("unsafe\nO1").names == ["Violence and Hate"]


# --- Code Llama 70B Instruct --------------------------------------------------------------------------------------

# The model card of codellama/CodeLlama-70b-Instruct-hf ("Chat prompt"): this dialog and its token ids.
CARD_DIALOG = [{"role": "system", "content": "System prompt    "}, {"role": "user", "content": "First user query"},
               {"role": "assistant", "content": "Model response to first query"},
               {"role": "user", "content": "Second user query"}]
CARD_IDS = [1, 7562, 29901, 1788, 13, 13, 2184, 9508, 32015, 7562, 29901, 1404, 13, 13, 3824, 1404, 2346, 32015,
            7562, 29901, 20255, 13, 13, 8125, 2933, 304, 937, 2346, 32015, 7562, 29901, 1404, 13, 13, 6440, 1404,
            2346, 32015, 7562, 29901, 20255, 13, 14994, 3381, 29901, 1404, 13, 13, 29871]
@pytest.fixture(scope="module")
def code70(tmp_path_factory):
    return Tokenizer(codellama_tokenizer(tmp_path_factory.mktemp("codellama")))


def test_codellama_70b_instruct_matches_the_model_card(code70):
    fmt = codellama.FAMILY_70B.chat_format(code70)
    assert fmt.encode_dialog_prompt(CARD_DIALOG) == CARD_IDS
    assert code70.id_to_piece(32015) == "<step>"


def test_codellama_70b_adds_an_empty_system_message_as_meta_does(code70):
    fmt = codellama.FAMILY_70B.chat_format(code70)
    with_empty = fmt.encode_dialog_prompt([{"role": "system", "content": ""}] + CARD_DIALOG[1:])
    assert fmt.encode_dialog_prompt(CARD_DIALOG[1:]) == with_empty


def test_codellama_70b_needs_the_step_piece(tok2):
    with pytest.raises(ValueError, match="<step>"):
        codellama.FAMILY_70B.chat_format(tok2).encode_dialog_prompt([{"role": "user", "content": "hi"}])


def test_a_guard_chat_prompt_takes_the_templates_excluded_category_keys(tok3, ref3):
    """Served, a guard's chat prompt is its moderation prompt; chat_template_kwargs' excluded_category_keys (the
    1B template's variable) leaves categories out, as the template does."""
    from llama.families.prompting import ChatPrompts

    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    body = _body(render("meta-llama-Llama-Guard-3-1B.jinja", parts, excluded_category_keys=["S1"]))
    ids = ChatPrompts(llamaguard.V3_1B, tok3).encode([{"role": "user", "content": "hi"}],
                                                      excluded_category_keys=["S1"])
    assert tok3.decode(ids).count("S1:") == 0 and body.strip() in tok3.decode(ids)
