"""The Tokenizer against the real Llama 2 vocabulary (tests/fixtures/llama2-tokenizer.model).

Expected ids come from three places that do not run our wrapper:
  * well-known Llama 2 ids, each checked piece by piece against the vocabulary table (and, for byte fallback,
    against the rule "byte b is piece <0xBB> with id b + 3");
  * llama.cpp's tokenizer test vectors for this vocabulary (models/ggml-vocab-llama-spm.gguf.inp/.out), copied
    below as data;
  * a second, independent BPE implementation: Hugging Face's Rust `tokenizers` BPE, set up through
    transformers.LlamaTokenizer from the same vocabulary (see `reference` below for how and why it is configured).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from sentencepiece import SentencePieceProcessor

from helpers import TOKENIZER, hf_llama_tokenizer
from llama import Tokenizer

README = TOKENIZER.parent / "README.md"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def sp() -> SentencePieceProcessor:
    """Plain SentencePiece, used only to read the vocabulary table (piece strings and scores), never to encode."""
    return SentencePieceProcessor(model_file=str(TOKENIZER))


# --- the vocabulary ------------------------------------------------------------------------------------------


def test_special_ids(tok):
    assert tok.n_words == 32000
    assert tok.bos_id == 1
    assert tok.eos_id == 2
    assert tok.pad_id == -1  # Llama 2 has no pad token


def test_accepts_str_and_pathlike(tok):
    assert Tokenizer(str(TOKENIZER)).encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert Tokenizer(Path(TOKENIZER)).n_words == 32000


@pytest.mark.parametrize("token, piece", [
    (0, "<unk>"), (1, "<s>"), (2, "</s>"), (13, "<0x0A>"), (29871, "\u2581"), (15043, "\u2581Hello"),
    (3186, "\u2581world"), (518, "\u2581["), (25580, "INST"), (29962, "]"), (29914, "/"),
    (29900, "0"), (29906, "2"), (29946, "4"),
])
def test_known_pieces(tok, token, piece):
    assert tok.id_to_piece(token) == piece


def test_byte_fallback_pieces_are_ids_3_to_258(tok):
    """The 256 byte pieces sit right after <unk>, <s>, </s>: byte b is id b + 3."""
    for b in range(256):
        assert tok.id_to_piece(b + 3) == f"<0x{b:02X}>"


def test_fixture_matches_documented_checksum():
    """tests/fixtures/README.md records where the fixture comes from; its checksum must be this file's."""
    text = README.read_text()
    documented = re.search(r"sha256[^0-9a-f]*([0-9a-f]{64})", text)
    assert documented, "README.md must state the fixture's sha256"
    assert hashlib.sha256(TOKENIZER.read_bytes()).hexdigest() == documented.group(1)


# --- known encodings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ids", [
    ("Hello", [15043]),
    (" Hello", [29871, 15043]),  # the dummy prefix plus the text's own space: "▁" then "▁Hello"
    ("Hello world", [15043, 3186]),
    ("\n", [29871, 13]),  # a lone "▁", then the newline as byte 0x0A
    ("a\nb", [263, 13, 29890]),
    ("\U0001F600", [29871, 243, 162, 155, 131]),  # 😀 = F0 9F 98 80, byte b -> id b + 3
    ("2024", [29871, 29906, 29900, 29906, 29946]),  # digits are always split one by one
    ("[INST]", [518, 25580, 29962]),
    ("[/INST]", [518, 29914, 25580, 29962]),
    ("", []),
])
def test_known_encodings(tok, text, ids):
    assert tok.encode(text, bos=False, eos=False) == ids


def test_emoji_ids_follow_from_utf8_bytes(tok):
    """Derive the emoji's ids from its UTF-8 bytes, not from any tokenizer: "▁" then one byte piece per byte."""
    for ch in ["\U0001F600", "\U0001F999", "\U0001F680"]:
        expected = [29871] + [b + 3 for b in ch.encode("utf-8")]
        assert tok.encode(ch, bos=False, eos=False) == expected


def test_each_digit_is_its_own_token(tok):
    digit_ids = {d: tok.encode(d, bos=False, eos=False)[-1] for d in "0123456789"}
    assert len(set(digit_ids.values())) == 10
    for d, token in digit_ids.items():
        assert tok.id_to_piece(token) == d
    number = "31415926535"
    assert tok.encode(number, bos=False, eos=False) == [29871] + [digit_ids[d] for d in number]


def test_markup_like_bos_eos_text_is_plain_text(tok):
    """The text "<s>" / "</s>" must never become the BOS/EOS ids: that would let a prompt forge turns."""
    assert tok.encode("<s>", bos=False, eos=False) == [529, 29879, 29958]  # "▁<" "s" ">"
    for text in ["<s>", "</s>", "a</s><s>b", "<unk>"]:
        ids = tok.encode(text, bos=False, eos=False)
        assert not {0, 1, 2} & set(ids), (text, ids)
        assert tok.decode(ids) == text


# --- BOS / EOS flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos, eos, expected", [
    (False, False, [15043, 3186]),
    (True, False, [1, 15043, 3186]),
    (False, True, [15043, 3186, 2]),
    (True, True, [1, 15043, 3186, 2]),
])
def test_bos_eos_flags(tok, bos, eos, expected):
    assert tok.encode("Hello world", bos=bos, eos=eos) == expected


def test_bos_eos_on_empty_text(tok):
    assert tok.encode("", bos=True, eos=True) == [1, 2]
    assert tok.encode("", bos=True, eos=False) == [1]
    assert tok.encode("", bos=False, eos=True) == [2]


def test_bos_eos_wrap_the_plain_encoding_only_at_the_ends(tok):
    for text in ["Hello", " leading space", "multi\nline\n", "\U0001F600 emoji", "3.14"]:
        plain = tok.encode(text, bos=False, eos=False)
        both = tok.encode(text, bos=True, eos=True)
        assert both == [1] + plain + [2]
        assert 1 not in plain and 2 not in plain


# --- decoding ------------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()",
    "日本語のテキストと中文文本",
    "한국어 텍스트",
    "\U0001F600\U0001F680 \U0001F636\u200d\U0001F32B\ufe0f \u2705",
    "  two  spaces,\ttabs\t\tand\nnew\n\nlines  ",
    " leading space",
    "trailing space ",
    "\n\n",
    "   ",
    "Ünïcödé café naïve Ωμέγα Привет",
    "def f(x):\n    return x ** 2\n",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # BOS/EOS decode to nothing


def test_decode_known_ids(tok):
    assert tok.decode([15043, 3186]) == "Hello world"
    assert tok.decode([1, 15043, 2]) == "Hello"
    assert tok.decode([29871, 243, 162, 155, 131]) == "\U0001F600"
    assert tok.decode([]) == ""


def test_decode_accepts_tensor_ids(tok):
    torch = pytest.importorskip("torch")
    assert tok.decode(torch.tensor([15043, 3186])) == "Hello world"


# --- errors --------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer(missing)
    assert str(missing) in str(err.value)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises((FileNotFoundError, IsADirectoryError, ValueError)) as err:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"hello world\n", b"\x08\x01\x10\x02" * 10],
                         ids=["random-bytes", "empty", "text", "truncated-protobuf"])
def test_non_sentencepiece_file_is_a_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        Tokenizer(path)
    assert str(path) in str(err.value)
    assert "SentencePiece" in str(err.value)


@pytest.mark.parametrize("value", [None, b"bytes", 42, ["a list"], 3.5])
def test_encode_non_str_is_a_type_error(tok, value):
    with pytest.raises(TypeError) as err:
        tok.encode(value, bos=True, eos=False)
    assert type(value).__name__ in str(err.value)


@pytest.mark.parametrize("ids, bad", [([32000], 32000), ([-1], -1), ([15043, 99999], 99999), ([1, 2, 10**9], 10**9)])
def test_decode_out_of_range_is_a_value_error(tok, ids, bad):
    with pytest.raises(ValueError) as err:
        tok.decode(ids)
    assert str(bad) in str(err.value)
    assert "32000" in str(err.value)  # the vocabulary size, so the user sees the range


@pytest.mark.parametrize("token", [32000, -1])
def test_id_to_piece_out_of_range_is_a_value_error(tok, token):
    with pytest.raises(ValueError) as err:
        tok.id_to_piece(token)
    assert str(token) in str(err.value)


def test_decode_float_id_is_rejected(tok):
    with pytest.raises((TypeError, ValueError)) as err:
        tok.decode([15043, 1.7])
    assert "1.7" in str(err.value)


# --- llama.cpp's test vectors for this vocabulary ------------------------------------------------------------
# Inputs from llama.cpp's models/ggml-vocab-*.gguf.inp, expected ids from models/ggml-vocab-llama-spm.gguf.out
# (two revisions of the file: one tests "Führer", the other "Äpfel", " discards", "Cửa Việt" and "!!!!!!").
# Those ids were produced by the original Llama 2 tokenizer, not by this project.

_LLAMA_CPP_BIG = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001F680 (normal) \U0001F636\u200d\U0001F32B\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001F999\U0001F999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001F601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_KHMER = "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\u1781\u179b\u1785\u17c1\u1789"
_KHMER_IDS = ("29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 161 153 228 161 186 31708 228 162 132 "
              "31708 228 161 165 31324 228 161 136 228 161 132 228 161 158 228 161 136 228 162 132 228 161 140")
_EMOJI_IDS = "243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 20787 953 3848 275 16125 630 29897 29871 31681"
_HELLO_YALL = "Hello, y'all! How are you \U0001F601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e"
_HELLO_YALL_IDS = ("15043 29892 343 29915 497 29991 1128 526 366 29871 243 162 155 132 1577 30672 31522 30505 11548 31041 "
                   "30732 29896 29941 29896 29946 29896 29945 29896 30408 30739")
_BIG_IDS = (
    "29871 13 29871 13 13 29871 13 13 13 29871 12 29871 12 12 29871 12 13 259 13 1678 13 268 "
    "13 418 13 243 162 157 131 313 8945 29897 29871 243 162 155 185 30722 243 162 143 174 30598 313 "
    "20787 953 3848 275 16125 630 29897 29871 31681 29871 243 162 169 156 243 162 169 156 29871 29941 29871 29941 "
    "29941 29871 29941 29941 29941 29871 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 "
    "29941 29871 29941 29941 29941 29941 29941 29941 29941 29871 29941 29941 29941 29941 29941 29941 29941 29941 29871 29941 29889 29941 "
    "29871 29941 636 29941 29871 29941 856 29941 29871 31849 31324 31934 228 162 142 228 161 146 228 162 133 228 "
    "161 153 228 161 186 31708 228 162 132 31708 228 161 165 31324 228 161 136 243 162 155 132 1577 "
    "30672 31522 30505 11548 31041 30732 29896 29941 29896 29946 29896 29945 29896 30408 30739 448 23648 2751 25512 1538 4851 665 "
    "1386 29713 1305 14550 4907 11120 16159 16159 16159 15945 15945 3045 636 6824 6824 6824 8773 8773 8773 306 29915 345 "
    "1063 525 29873 1025 540 29915 29879 727 29892 525 1525 366 1854 29973 525 29924 451 1854 306 29915 645 1207 "
    "372 29892 525 29928 366 763 777 23429 29973 1334 29915 29963 29872 263 29915 29880 29931"
)

LLAMA_CPP_VECTORS = [
    ("ied 4 \u00bd months", "474 287 29871 29946 29871 30226 7378"),
    ("F\u00fchrer", "383 4000 261"),
    ("\u00c4pfel", "11585 7810 295"),
    ("", ""),
    (" ", "259"),
    ("  ", "1678"),
    ("   ", "268"),
    ("\t", "29871 12"),
    ("\n", "29871 13"),
    ("\n\n", "29871 13 13"),
    ("\n\n\n", "29871 13 13 13"),
    ("\t\n", "29871 12 13"),
    ("Hello world", "15043 3186"),
    (" Hello world", "29871 15043 3186"),
    ("Hello World", "15043 2787"),
    (" Hello World", "29871 15043 2787"),
    (" Hello World!", "29871 15043 2787 29991"),
    ("Hello, world!", "15043 29892 3186 29991"),
    (" Hello, world!", "29871 15043 29892 3186 29991"),
    (" this is \U0001F999.cpp", "29871 445 338 29871 243 162 169 156 29889 8223"),
    ("w048 7tuijk dsdfhu", "281 29900 29946 29947 29871 29955 9161 13535 18031 2176 6905"),
    ("\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438",
     "1538 4851 665 1386 29713 1305"),
    (_KHMER, _KHMER_IDS),
    ("\U0001F680 (normal) \U0001F636\u200d\U0001F32B\ufe0f (multiple emojis concatenated) \u2705 "
     "(only emoji that has its own token)",
     "29871 " + _EMOJI_IDS + " 313 6194 953 29877 2397 393 756 967 1914 5993 29897"),
    ("Hello", "15043"),
    (" Hello", "29871 15043"),
    ("  Hello", "259 15043"),
    ("   Hello", "1678 15043"),
    ("    Hello", "268 15043"),
    ("    Hello\n    Hello", "268 15043 13 1678 15043"),
    (" (", "29871 313"),
    ("\n =", "29871 13 353"),
    ("' era", "525 3152"),
    (_HELLO_YALL, _HELLO_YALL_IDS),
    ("!!!!!!", "1738 6824 21004"),
    *[("3" * n, " ".join(["29871"] + ["29941"] * n)) for n in range(1, 10)],
    ("C\u1eeda Vi\u1ec7t", "315 228 190 176 29874 10630 30529 29873"),
    (" discards", "29871 2313 3163"),
    (_LLAMA_CPP_BIG, _BIG_IDS),
]


def test_llama_cpp_vector_count():
    assert len(LLAMA_CPP_VECTORS) == 47
    assert len({text for text, _ in LLAMA_CPP_VECTORS}) == 47


@pytest.mark.parametrize("text, ids", LLAMA_CPP_VECTORS, ids=[f"v{i:02d}" for i in range(len(LLAMA_CPP_VECTORS))])
def test_llama_cpp_vectors(tok, text, ids):
    expected = [int(x) for x in ids.split()]
    assert tok.encode(text, bos=False, eos=False) == expected
    assert tok.decode(expected) == text


# --- cross-check against an independent implementation (Hugging Face tokenizers) -----------------------------


@pytest.fixture(scope="module")
def reference(sp):
    """transformers.LlamaTokenizer (Rust `tokenizers` BPE with byte fallback) over the fixture's vocabulary.

    Set-up, and why:
      * transformers 5 would convert a tokenizer.model through protobuf, which is not installed here, so the same
        conversion is done by hand: the piece table (strings and scores, plain data) is read with SentencePiece
        and transformers' own `generate_merges` turns it into BPE merges. The merges are ranked by piece score,
        as SentencePiece ranks them; ranked by id (transformers 5's default) the whitespace-only pieces "▁▁",
        "▁▁▁", ... which Llama 2 scores -1e9 would merge too early (" Hello" -> "▁▁" "Hello").
      * The normalizer is the "legacy" Llama one of transformers 4: prepend "▁", replace each space by "▁", no
        pre-tokenizer. (transformers 5's Metaspace pre-tokenizer adds no "▁" to a text that already starts with a
        space, so " Hello" would lose Llama's 29871.)
      * split_special_tokens=True when encoding plain text: "<s>" in a text is text for Llama's reference
        tokenizer, not the BOS token.
    """
    return hf_llama_tokenizer(sp, add_bos_token=True, add_eos_token=True)


CROSS_CHECK_CORPUS = [
    "Hello", " Hello", "Hello world", "\n", "\U0001F600", "2024", "[INST] hi [/INST]",
    "<<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n",
    "  two  spaces", "x   \n  y", "tab\there\t", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u00dcn\u00efc\u00f6d\u00e9 caf\u00e9 na\u00efve", "def f(x):\n    return x ** 2\n",
    "https://example.com/a?b=c&d=e#frag", "2024-01-01T12:00:00Z costs $3.50 (or \u20ac3,20)",
    "\u200b zero width", "\u01c5 \ufb01 \u216b", "<s>hi</s> <unk>", "   leading and trailing   ",
    "I've been 'told he's there, 'RE you sure?", "\U0001F468\u200d\U0001F469\u200d\U0001F467 family",
    "Mixed\r\nline endings\rhere",
]


def test_reference_agrees_on_well_known_ids(reference):
    """The reference itself is sane before it is used as a second opinion."""
    assert len(reference) == 32000
    assert reference.encode("Hello world", add_special_tokens=False) == [15043, 3186]
    assert reference.encode(" Hello", add_special_tokens=False) == [29871, 15043]


@pytest.mark.parametrize("text", CROSS_CHECK_CORPUS + [text for text, _ in LLAMA_CPP_VECTORS])
def test_encode_matches_reference(tok, reference, text):
    expected = reference.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert tok.encode(text, bos=False, eos=False) == expected


@pytest.mark.parametrize("text", CROSS_CHECK_CORPUS[:8])
def test_bos_eos_match_reference(tok, reference, text):
    """The reference is built with add_bos_token and add_eos_token: its default encode is BOS + ids + EOS."""
    expected = reference.encode(text, split_special_tokens=True)
    assert tok.encode(text, bos=True, eos=True) == expected


@pytest.mark.parametrize("text", CROSS_CHECK_CORPUS)
def test_decode_matches_reference(tok, reference, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True) == text
