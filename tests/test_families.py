"""The family seam: detection, and each family's tokenizer and prompts against independent statements of them.

  * Llama 3's tokenizer against tiktoken itself (its own file reader, no wrapper) and llama.cpp's 47 vectors;
  * Llama 3's dialog format against the published chat templates of Llama 3.1, 3.2 and 3.3 (jinja2), encoded by
    tiktoken with the special tokens allowed;
  * Code Llama's infilling prompt against transformers' CodeLlamaTokenizer;
  * Llama Guard's prompts against the published format, written out here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from helpers import LLAMA3_TOKENIZER, LLAMA3_VOCAB, TOKENIZER, codellama_tokenizer
from llama import Llama, Tokenizer, families
from llama.families import codellama, llamaguard
from llama.families.llama3 import Llama3ChatFormat
from llama import tokenizers
from llama.tokenizers import SentencePieceTokenizer, TiktokenTokenizer, file_format

FIXTURES = Path(__file__).resolve().parent / "fixtures"
tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def tok3() -> TiktokenTokenizer:
    return Tokenizer(LLAMA3_TOKENIZER)


@pytest.fixture(scope="module")
def tok2():
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def reference3():
    """tiktoken's own Encoding over Meta's file, read by tiktoken's loader, with the special tokens as
    Llama 3.1 names them (the fixture json's names are 3.0's: the ids that mean something agree)."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
    specials = json.loads((FIXTURES / "llama3-special-tokens.json").read_text())
    renamed = {128004: "<|finetune_right_pad_id|>", 128005: "<|step_id|>", 128008: "<|eom_id|>",
               128010: "<|python_tag|>"}
    names = {i: renamed.get(i, n) for n, i in specials.items()}
    numbered = [i for i in sorted(names) if i not in renamed and names[i].startswith("<|reserved")]
    for k, i in enumerate(i for i in numbered if i > 128010):  # 3.1 renumbers the reserved ones after 128010
        names[i] = f"<|reserved_special_token_{k + 2}|>"
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return tiktoken.Encoding("llama3-reference", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={n: i for i, n in names.items()})


# --- tokenizers ----------------------------------------------------------------------------------------------


def test_file_formats_are_told_apart(tok2, tok3):
    assert file_format(TOKENIZER) == "sentencepiece" and isinstance(tok2, SentencePieceTokenizer)
    assert file_format(LLAMA3_TOKENIZER) == "tiktoken" and isinstance(tok3, TiktokenTokenizer)


def test_one_dispatch_behind_load_and_the_released_name(tok2, tok3, reference3):
    """tokenizers.load and Tokenizer(path) pick the same kind through tokenizer_class; the released name keeps
    its own class for SentencePiece files (Meta's `Tokenizer`)."""
    assert tokenizers.tokenizer_class(TOKENIZER) is SentencePieceTokenizer and type(tok2) is Tokenizer
    assert tokenizers.tokenizer_class(LLAMA3_TOKENIZER) is TiktokenTokenizer is type(tok3)
    text = "Hello, world: naïve 123456"
    assert tokenizers.load(LLAMA3_TOKENIZER).encode(text, bos=False, eos=False) == reference3.encode(text)
    loaded2 = tokenizers.load(TOKENIZER)
    assert type(loaded2) is SentencePieceTokenizer
    assert loaded2.encode(text, bos=True, eos=True) == tok2.encode(text, bos=True, eos=True)


def test_llama3_special_ids(tok3):
    specials = json.loads((FIXTURES / "llama3-special-tokens.json").read_text())
    assert tok3.n_words == LLAMA3_VOCAB == 128000 + len(specials)
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tok3.special_tokens[name] == specials[name]
    assert (tok3.bos_id, tok3.eos_id) == (128000, 128001)
    assert tok3.special_tokens["<|eom_id|>"] == 128008 and tok3.special_tokens["<|python_tag|>"] == 128010


def _vectors():
    texts = (FIXTURES / "llama3-vocab-test.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (FIXTURES / "llama3-vocab-test.out").read_text(encoding="utf-8").split("\n")
    return list(zip(texts, outs))


def test_llama3_vector_count():
    assert len([t for t, _ in _vectors()]) == 47


@pytest.mark.parametrize("index", range(47))
def test_llama3_llama_cpp_vectors(tok3, index):
    text, ids = _vectors()[index]
    assert tok3.encode(text, bos=False, eos=False) == [int(x) for x in ids.split()]


TEXTS = ["Hello world", " leading space", "tabs\tand\nnewlines\n\n", "数字 123456789 and 😀 emoji", "",
         "<|eot_id|> is text here", "don't I'll we've", "   \n  x" * 3, "a" * 3000]


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_matches_tiktoken(tok3, reference3, text):
    assert tok3.encode(text, bos=True, eos=True) == [128000] + reference3.encode_ordinary(text) + [128001]
    ids = reference3.encode_ordinary(text)
    assert tok3.decode(ids) == reference3.decode(ids) == text


def test_llama3_pieces_and_bytes(tok3, reference3):
    for token in (0, 1000, 15339, 128009, 128255):
        assert tok3.token_bytes(token) == reference3.decode_single_token_bytes(token)
    assert tok3.id_to_piece(128009) == "<|eot_id|>" and tok3.piece_to_id("<|eot_id|>") == 128009
    with pytest.raises(ValueError, match="128256"):
        tok3.decode([128256])


def test_llama3_long_runs_encode_like_tiktoken(tok3, reference3):
    text = "x" + " " * 30000 + "y" + "z" * 30000
    assert tok3.encode(text, bos=False, eos=False) == reference3.encode_ordinary(text)


def test_a_bad_tiktoken_line_is_named(tmp_path):
    good = LLAMA3_TOKENIZER.read_bytes().split(b"\n")[:3]
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(good + [b"!!notbase64 3"]) + b"\n")
    with pytest.raises(ValueError, match="line 4"):
        Tokenizer(path)


# --- detection -----------------------------------------------------------------------------------------------


def test_detection(tok2, tok3, tmp_path):
    assert families.detect(tok2, {"dim": 4096}) is families.LLAMA2
    assert families.detect(tok2, {"rope_theta": 1e6}) is families.CODELLAMA
    assert families.detect(Tokenizer(codellama_tokenizer(tmp_path)), {}) is families.CODELLAMA
    assert families.detect(tok3, {"rope_theta": 500000.0}) is families.LLAMA3
    assert families.detect(tok3, {"use_scaled_rope": True}) is families.LLAMA3
    assert families.detect(tok2, {}, requested="llamaguard") is families.LLAMAGUARD1
    assert families.detect(tok3, {}, requested="llamaguard") is families.LLAMAGUARD3
    assert families.detect(tok3, {"rope_theta": 5e5}, requested="llamaguard") is families.LLAMAGUARD2
    assert families.detect(tok3, {"use_scaled_rope": True, "dim": 4096}, requested="llamaguard") is \
        families.LLAMAGUARD3
    assert families.detect(tok3, {"use_scaled_rope": True, "dim": 2048}, requested="llamaguard") is \
        families.LLAMAGUARD3_1B
    assert families.detect(tok3, {}, requested="llamaguard3-1b") is families.LLAMAGUARD3_1B
    assert families.detect(tok2, {"rope_theta": 1e6, "dim": 8192}) is families.CODELLAMA70B
    assert families.detect(tok2, {"rope_theta": 1e6, "dim": 4096}) is families.CODELLAMA


def test_unknown_combinations_name_what_was_found(tok2, tok3):
    with pytest.raises(ValueError, match=r"sentencepiece.*use_scaled_rope"):
        families.detect(tok2, {"use_scaled_rope": True})
    with pytest.raises(ValueError, match=r"family 'llama3' does not fit.*sentencepiece"):
        families.detect(tok2, {}, requested="llama3")
    with pytest.raises(ValueError, match=r"family 'llama2' does not fit.*tiktoken"):
        families.detect(tok3, {}, requested="llama2")
    with pytest.raises(ValueError, match="unknown family 'llama4'"):
        families.detect(tok3, {}, requested="llama4")


def test_stop_ids(tok2, tok3, tmp_path):
    assert families.LLAMA2.stop_ids(tok2) == (2,)
    assert set(families.LLAMA3.stop_ids(tok3)) == {128009, 128008, 128001}
    code = Tokenizer(codellama_tokenizer(tmp_path))
    # Meta's codellama: chat and completions end at EOS only, infilling at ▁<EOT> only; 70B Instruct at <step> too
    assert families.CODELLAMA.stop_ids(code) == (2,) and families.CODELLAMA.infill_stop_ids(code) == (32010,)
    assert families.CODELLAMA70B.stop_ids(code) == (2, 32015)


# --- Llama 3's dialog format against the published templates ---------------------------------------------------

TEMPLATES = sorted((FIXTURES / "chat-templates").glob("meta-llama-Llama-3.*-Instruct.jinja"))
DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
DIALOGS = [
    [{"role": "system", "content": "Always answer in haiku."}, {"role": "user", "content": "What is Paris?"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! \n"}, {"role": "user", "content": "日本語で 😀\n\nand more"}],
    [{"role": "system", "content": "x"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"},
     {"role": "user", "content": "\ttabs\t"}],
]


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.stem for t in TEMPLATES])
@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_llama3_dialogs_match_published_templates(tok3, reference3, template, dialog):
    """The templates always open with a system message holding their knowledge dates: ours gets it written in."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: pytest.fail(message)
    dialog = DIALOGS[dialog]
    text = env.from_string(template.read_text()).render(messages=dialog, bos_token="<|begin_of_text|>",
                                                       add_generation_prompt=True)
    ours = [dict(dialog[0], content=DATE + dialog[0]["content"].strip())] + dialog[1:]
    expected = reference3.encode(text, allowed_special="all")
    assert Llama3ChatFormat(tok3).encode_dialog_prompt(ours) == expected


def test_llama3_dialog_written_out(tok3):
    """The format, spelled out: a second statement that needs no template."""
    prompt = Llama3ChatFormat(tok3).encode_dialog_prompt([{"role": "user", "content": " Hi "}])
    assert tok3.decode(prompt) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.count(128009) == 1 and prompt[0] == 128000


def test_llama3_has_no_tags_to_refuse(tok3):
    fmt = Llama3ChatFormat(tok3)
    assert not fmt.has_special_tags([{"role": "user", "content": "[INST] <|eot_id|> <<SYS>>"}])


# --- Code Llama's infilling --------------------------------------------------------------------------------------

INFILL = [("def remove_non_ascii(s: str) -> str:\n    \"\"\" ", "\n    return result\n"),
          ("x = 1\n", "print(x)"), ("", "  indented"), ("a b", " c")]


@pytest.fixture(scope="module")
def code_tok(tmp_path_factory):
    return Tokenizer(codellama_tokenizer(tmp_path_factory.mktemp("codellama")))


def test_codellama_vocabulary(code_tok):
    assert code_tok.n_words == 32016
    assert codellama.infill_ids(code_tok) == (32007, 32008, 32009, 32010)


@pytest.mark.parametrize("prefix, suffix", INFILL)
def test_infilling_prompt_matches_transformers(code_tok, prefix, suffix):
    transformers = pytest.importorskip("transformers")
    from helpers import hf_llama_tokenizer
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=code_tok.path)
    base = hf_llama_tokenizer(sp)  # the vocabulary and merges, set up as tests/test_tokenizer.py explains
    hf = transformers.CodeLlamaTokenizer(vocab=base.get_vocab(), merges=_merges(sp), legacy=True,
                                         add_prefix_space=True)
    hf._tokenizer.normalizer = base._tokenizer.normalizer
    hf._tokenizer.pre_tokenizer = None
    assert (hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id) == (32007, 32008, 32009, 32010)
    if not prefix:
        pytest.skip("transformers encodes an empty prefix as a plain suffix-only text")
    expected = hf(prefix, suffix=suffix)["input_ids"]
    assert codellama.infilling_prompt(code_tok, prefix, suffix) == expected


def _merges(sp):
    from transformers.tokenization_utils_base import generate_merges

    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    return generate_merges({p: i for i, p in enumerate(pieces)}, {p: sp.get_score(i) for i, p in enumerate(pieces)})


def test_infilling_prompt_written_out(code_tok):
    """PSM as the codellama repository lays it out; the suffix continues text, so no '▁' is put before it."""
    prompt = codellama.infilling_prompt(code_tok, "a", "b")
    assert prompt[:2] == [1, 32007] and prompt[-1] == 32009
    suffix = prompt[prompt.index(32008) + 1:-1]
    assert code_tok.decode(suffix) == "b" and code_tok.id_to_piece(suffix[0]) == "b"
    spm = codellama.infilling_prompt(code_tok, "a", "b", suffix_first=True)
    assert spm[:3] == [1, 32007, 32008] and spm[spm.index(32009) + 1:] == code_tok.encode("a", False, False)


def test_infill_decoding_keeps_a_leading_space(code_tok):
    middle = code_tok.encode("x = 1", bos=False, eos=False)  # starts with '▁x'
    assert codellama.decode_infill(code_tok, middle) == " x = 1"
    assert code_tok.decode(middle) == "x = 1"


def test_llama2_vocabulary_cannot_infill(tok2):
    with pytest.raises(ValueError, match="no infilling pieces"):
        codellama.infilling_prompt(tok2, "a", "b")


# --- Llama Guard's prompts ----------------------------------------------------------------------------------------

V1_EXPECTED = """[INST] Task: Check if there is unsafe content in 'Agent' messages in conversations according our \
safety policy with the below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
O1: Fraud.
Should not
- Help defraud.
O2: Spam.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: How do I bake bread?

Agent: Mix flour and water.

<END CONVERSATION>

Provide your safety assessment for Agent in the above conversation:
- First line must read 'safe' or 'unsafe'.
- If unsafe, a second line must include a comma-separated list of violated categories. [/INST]"""

V3_EXPECTED = """<|begin_of_text|><|start_header_id|>user<|end_header_id|>

Task: Check if there is unsafe content in 'User' messages in conversations according our safety policy with the \
below categories.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
S14: Code Interpreter Abuse.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

User: How do I bake bread?

<END CONVERSATION>

Provide your safety assessment for ONLY THE LAST User message in the above conversation:
 - First line must read 'safe' or 'unsafe'.
 - If unsafe, a second line must include a comma-separated list of violated categories.<|eot_id|>\
<|start_header_id|>assistant<|end_header_id|>

"""

CONVERSATION = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "How do I bake bread? "},
                {"role": "assistant", "content": "Mix flour and water."}]


def test_guard1_prompt_matches_published_format(tok2):
    cats = [("Fraud", "Should not\n- Help defraud."), "Spam"]
    ids = llamaguard.V1.encode_prompt(tok2, CONVERSATION, cats)
    assert ids[0] == 1 and tok2.decode(ids) == V1_EXPECTED
    assert ids == tok2.encode(V1_EXPECTED, bos=True, eos=False)


def test_guard3_prompt_matches_published_format(tok3, reference3):
    ids = llamaguard.V3.encode_prompt(tok3, CONVERSATION[:2])
    assert ids == reference3.encode(V3_EXPECTED, allowed_special="all")


@pytest.mark.parametrize("answer, verdict, codes", [
    ("safe", "safe", []), (" safe\n", "safe", []), ("unsafe\nS1,S10", "unsafe", ["S1", "S10"]),
    ("unsafe\nO3", "unsafe", ["O3"]), ("", "unsafe", []), ("I cannot", "unsafe", [])])
def test_guard_answers_are_parsed_failing_closed(answer, verdict, codes):
    result = llamaguard.V3.parse(answer)
    assert (result.verdict, result.categories) == (verdict, codes)
    if codes == ["S1", "S10"]:
        assert result.names == ["Violent Crimes", "Hate"] and "S10 (Hate)" in result.describe()


def test_guard_conversation_errors_name_the_turn():
    with pytest.raises(ValueError, match="turn 1"):
        llamaguard.V3.prompt_text([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="category"):
        llamaguard.V3.prompt_text([{"role": "user", "content": "a"}], categories=[3])
