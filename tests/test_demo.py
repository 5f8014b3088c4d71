"""The bundled demo model (demo/fortune-llama) and the script that trains it (scripts/train_demo.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from forked import run_python
from helpers import ROOT

DEMO = ROOT / "demo" / "fortune-llama"
SCRIPT = ROOT / "scripts" / "train_demo.py"
META_FILES = ("consolidated.00.pth", "params.json", "tokenizer.model")

# Held-out log-likelihood the demo must beat, in nats per token, on demo/fortune-llama/heldout.txt (each
# fortune scored alone: BOS + text + EOS, every token after BOS predicted), bfloat16 on CPU. The training run
# measured HELDOUT_TXT_MEASURED (metrics.json "heldout_txt_loss_bf16"); the threshold leaves a margin for
# other CPUs' bfloat16 arithmetic. The uniform baseline is ln(4096) = 8.32. The chat stage costs the fortunes a
# little: 4.368 after pretraining alone (1000 steps), 4.458 once it also chats (450 more steps on dialogs).
HELDOUT_TXT_MEASURED = 4.458  # the committed run (seed 1234); metrics.json: held-out split 4.377
HELDOUT_THRESHOLD = 4.6


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fortunes(path: Path):
    docs, current = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line == "%":
            docs.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current).strip("\n"))
    return [d for d in docs if d.strip()]


# --- the committed demo ------------------------------------------------------------------------------------


def test_demo_folder_is_complete_small_and_in_metas_layout():
    for name in (*META_FILES, "heldout.txt", "metrics.json", "training_curve.png", "README.md"):
        assert (DEMO / name).is_file(), f"demo/fortune-llama/{name} is missing"
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"demo folder is {total / 2**20:.1f} MB, over 20 MB"
    params = json.loads((DEMO / "params.json").read_text())
    assert params["n_kv_heads"] < params["n_heads"], "the demo should use grouped-query attention"
    state = torch.load(DEMO / "consolidated.00.pth", map_location="cpu", weights_only=True, mmap=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "rope.freqs" in state and "layers.0.attention.wk.weight" in state
    n_params = sum(t.numel() for k, t in state.items() if k != "rope.freqs")
    assert 1_000_000 <= n_params <= 10_000_000, n_params
    readme = (DEMO / "README.md").read_text()
    assert "not Llama 2" in readme


@pytest.fixture(scope="module")
def demo_generator():
    from llama import Llama

    return Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=4, device="cpu")


def test_demo_tokenizer_has_llamas_special_ids(demo_generator):
    tok = demo_generator.tokenizer
    assert (tok.sp_model.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.id_to_piece(3) == "<0x00>"  # byte fallback
    assert tok.decode(tok.encode("Hello, world!\n  \u00e9\u2603", bos=False, eos=False)) == "Hello, world!\n  \u00e9\u2603"


def test_demo_heldout_loglikelihood_beats_threshold(demo_generator):
    metrics = json.loads((DEMO / "metrics.json").read_text())
    tok, model = demo_generator.tokenizer, demo_generator.model
    docs = _fortunes(DEMO / "heldout.txt")
    assert len(docs) >= 20 and sum(map(len, docs)) >= 3000
    total, count = 0.0, 0
    with torch.inference_mode():
        for doc in docs:
            ids = torch.tensor([tok.encode(doc, bos=True, eos=True)[:256]])
            logits = model(ids[:, :-1])  # start_pos 0: the KV cache is simply overwritten
            total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    loss = total / count
    uniform = math.log(tok.n_words)
    assert abs(metrics["uniform_baseline"] - uniform) < 1e-3
    assert loss < HELDOUT_THRESHOLD, f"held-out loss {loss:.3f} nats/token, threshold {HELDOUT_THRESHOLD}"
    assert loss < uniform - 3.0, f"held-out loss {loss:.3f} is not far below the uniform {uniform:.3f}"
    # What this test measures agrees with what the training run reported for the same file.
    assert abs(loss - metrics["heldout_txt_loss_bf16"]) < 0.1, (loss, metrics["heldout_txt_loss_bf16"])
    assert metrics["heldout_loss"] < uniform - 3.0


def test_demo_greedy_completions_read_as_words(demo_generator):
    prompts = ["The secret of success is", "A friend is someone who", "Never trust a", "Life is"]
    results = demo_generator.text_completion(prompts, temperature=0, max_gen_len=24)
    vocabulary = set()
    for doc in _fortunes(DEMO / "heldout.txt"):
        vocabulary.update(w.strip(".,;:!?\"'()-").lower() for w in doc.split())
    for prompt, result in zip(prompts, results):
        words = [w.strip(".,;:!?\"'()-").lower() for w in result["generation"].split()]
        words = [w for w in words if w]
        assert len(words) >= 3, (prompt, result["generation"])
        common = [w for w in words if w in vocabulary]
        assert len(common) >= 0.5 * len(words), (prompt, result["generation"])


# Greetings and questions worded as no training dialog is: a handful from the held-out dialogs the training run
# wrote (heldout_dialogs.json), and some written here.
CHAT_QUESTIONS = ["Hey, nice to see you!", "Who built you?", "What can you tell me?", "Goodbye for now.",
                  "Could you share a fortune?", "What is the capital of Italy?"]


def _chat_prompts() -> list:
    held = json.loads((DEMO / "heldout_dialogs.json").read_text())
    firsts, seen = [], set()
    for dialog in held:  # one question per answer template: greetings, thanks, the project, facts...
        question, answer = dialog[0]["content"], dialog[-1]["content"]
        key = answer.split()[0]
        if len(dialog) == 2 and key not in seen:
            seen.add(key)
            firsts.append(question)
    return firsts[:10] + CHAT_QUESTIONS


def _assert_clean_answer(question: str, result: dict, max_gen_len: int) -> None:
    text = result["generation"]["content"]
    words = [w for w in text.split() if any(ch.isalnum() for ch in w)]  # "6", "fortune-llama," and "Paris."
    assert len(words) >= 2 and len(words) >= 0.8 * len(text.split()), (question, text)
    assert len(result["tokens"]) < max_gen_len, f"{question!r}: no EOS within {max_gen_len} tokens: {text!r}"
    assert not any(tag in text for tag in ("[INST]", "[/INST]", "<<SYS>>", "]")), (question, text)
    assert text.strip()[-1] in ".!?", (question, text)  # a sentence, ended by the model itself


@pytest.mark.parametrize("temperature", [0, 0.6])
def test_demo_chats_in_short_sentences_that_end_by_themselves(demo_generator, temperature):
    """The first impression of chat.py, the web page and the server: held-out greetings and questions get
    short answers made of words, ended by EOS, with no chat tags or stray brackets (greedy, and sampled at the
    default temperature)."""
    questions = _chat_prompts()
    assert len(questions) >= 10
    max_gen_len = 64
    for start in range(0, len(questions), 4):
        batch = questions[start: start + 4]
        results = demo_generator.chat_completion([[{"role": "user", "content": q}] for q in batch],
                                                 temperature=temperature, max_gen_len=max_gen_len, logprobs=True)
        for question, result in zip(batch, results):
            _assert_clean_answer(question, result, max_gen_len)


# --- the example scripts default to the demo -----------------------------------------------------------------


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_example_scripts_run_with_no_arguments(script):
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} does not exist yet")
    proc = run_python(str(path), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)  # forked.py
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "demo" in line.lower()]
    assert lines and "fortune-llama" in lines[0], proc.stdout[:2000]
    assert proc.stdout.count("> ") >= 4, proc.stdout[-2000:]


def test_chat_script_runs_the_demo_with_no_arguments():
    proc = run_python(str(ROOT / "chat.py"), "--temperature", "0", "--max_gen_len", "24", cwd=ROOT,
                      env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin="The secret of success is\n/quit\n",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "demo" in line.lower()]
    assert lines and "fortune-llama" in lines[0], proc.stdout[:2000]
    answer = proc.stdout.split("The secret of success is", 1)[1]
    assert sum(ch.isalpha() for ch in answer) >= 10, proc.stdout[-2000:]


# --- the training script --------------------------------------------------------------------------------------

PROVERBS = [
    "A stitch in time saves nine.", "Actions speak louder than words.", "All that glitters is not gold.",
    "Better late than never.", "Birds of a feather flock together.", "Every cloud has a silver lining.",
    "Fortune favours the bold.", "Great minds think alike.", "Honesty is the best policy.",
    "If it ain't broke, don't fix it.", "Knowledge is power.", "Laughter is the best medicine.",
    "Look before you leap.", "No man is an island.", "Practice makes perfect.", "Rome wasn't built in a day.",
    "The early bird catches the worm.", "Time is money.", "Two heads are better than one.",
    "When in Rome, do as the Romans do.", "Where there's a will, there's a way.", "You can't judge a book by "
    "its cover.", "An apple a day keeps the doctor away.", "Don't count your chickens before they hatch.",
]


def _tiny_corpus(path: Path) -> Path:
    """About 5 KB of fortunes: proverbs, half with a numbered attribution line, '%' between them."""
    docs = [f"{p}\n\t\t-- Proverb number {i}" if i % 2 else f"{p} (number {i})" for i, p in enumerate(PROVERBS * 4)]
    path.write_text("\n%\n".join(docs) + "\n%\n", encoding="utf-8")
    return path


TINY = ["--vocab_size", "400", "--dim", "32", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
        "--multiple_of", "16", "--seq_len", "96", "--batch_size", "4", "--max_steps", "6", "--warmup", "2",
        "--eval_every", "3", "--eval_windows", "4", "--log_every", "2", "--heldout_frac", "0.1",
        "--heldout_sample_chars", "500", "--threads", "1", "--seed", "7", "--chat_steps", "3", "--chat_batch", "4",
        "--chat_lm_batch", "1", "--chat_warmup", "1"]


def _train(corpus: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python scripts/train_demo.py ...` in a fork of a process that has imported torch (tests/forked.py): the
    five runs below would otherwise spend a third of their time importing it."""
    return run_python(str(SCRIPT), "--corpus", str(corpus), "--out", str(out), *TINY, *extra, cwd=ROOT,
                      env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


def test_training_script_end_to_end_is_deterministic(tmp_path):
    pytest.importorskip("matplotlib", reason="the training script draws its curve with matplotlib "
                                             "(pip install matplotlib, or .[train])")
    from llama import Llama

    corpus = _tiny_corpus(tmp_path / "proverbs.txt")
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for out in runs:
        proc = _train(corpus, out)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        for name in (*META_FILES, "heldout.txt", "metrics.json", "training_curve.png", "chat_curve.png",
                     "heldout_dialogs.json"):
            assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "step 6/6" in proc.stdout and "chat step 3/3" in proc.stdout

    metrics = json.loads((runs[0] / "metrics.json").read_text())
    for key in ("train_loss", "heldout_loss", "heldout_txt_loss_bf16", "uniform_baseline"):
        assert math.isfinite(metrics[key]), key
    assert math.isfinite(metrics["chat"]["heldout_answer_loss"])
    assert metrics["pretraining"]["steps"] == 6 and metrics["chat"]["steps"] == 3
    assert metrics["unit"] == "nats per token"
    held = json.loads((runs[0] / "heldout_dialogs.json").read_text())
    assert held and all(d[-1]["role"] == "assistant" for d in held)
    assert (runs[0] / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    params = json.loads((runs[0] / "params.json").read_text())
    assert params["n_heads"] == 4 and params["n_kv_heads"] == 2

    # Same seed, same files: the tokenizer and every weight are identical.
    assert (runs[0] / "tokenizer.model").read_bytes() == (runs[1] / "tokenizer.model").read_bytes()
    first, second = (torch.load(r / "consolidated.00.pth", weights_only=True) for r in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((runs[1] / "metrics.json").read_text())["heldout_loss"] == metrics["heldout_loss"]

    # The chat stage added to an earlier run's folder (--init_from, how the committed demo got its chat stage)
    # gives the very weights of the run that did both stages at once.
    staged = tmp_path / "staged"
    assert _train(corpus, staged, "--chat_steps", "0").returncode == 0
    proc = _train(corpus, staged, "--init_from", str(staged), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    third = torch.load(staged / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(first[k], third[k]) for k in first)
    assert (staged / "tokenizer.model").read_bytes() == (runs[0] / "tokenizer.model").read_bytes()

    # The output loads with the library as any Llama checkpoint does.
    generator = Llama.build(str(runs[0]), str(runs[0] / "tokenizer.model"), max_seq_len=32, max_batch_size=2,
                            device="cpu")
    out = generator.text_completion(["A stitch"], temperature=0, max_gen_len=5)
    assert isinstance(out[0]["generation"], str)

    # A second run into the same folder refuses to overwrite without --overwrite.
    proc = _train(corpus, runs[0])
    assert proc.returncode != 0 and "--overwrite" in proc.stderr


def test_missing_debian_corpus_names_the_package(tmp_path, monkeypatch):
    module = _load_script()
    monkeypatch.setattr(module, "DEBIAN_FORTUNES", tmp_path / "no-fortunes")
    with pytest.raises(SystemExit, match=r"apt-get install fortunes"):
        module.corpus_files(module.DEBIAN_FORTUNES, ())
    with pytest.raises(SystemExit, match="neither a file nor a directory"):
        module.corpus_files(tmp_path / "elsewhere", ())


def test_corpus_parsing(tmp_path):
    module = _load_script()
    assert module.split_documents("one\n%\n\ttwo\n  -- x  \n%\n%\n") == ["one", "    two\n  -- x"]
    assert module.split_documents("para one\nline\n\n\npara two\n") == ["para one\nline", "para two"]
    assert module.clean("_\bb_\bo_\bl_\bd text") == "bold text"
    folder = tmp_path / "fortunes"
    folder.mkdir()
    (folder / "kept").write_text("Alpha.\n%\nBeta.\n%\n")
    (folder / "kept.dat").write_bytes(b"\x00\x01")
    (folder / "skipped").write_text("Gamma.\n%\n")
    (folder / "dupes").write_text("alpha.\n%\nDelta.\n")
    docs, files = module.load_corpus(folder, ["skipped"])
    assert files == ["dupes", "kept"]  # sorted; .dat index files and excluded names are skipped
    assert docs == ["alpha.", "Delta.", "Beta."]  # "Alpha." is a duplicate (case and spacing ignored)
    train, held = module.split_heldout([f"doc {i}" for i in range(100)], 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert module.split_heldout([f"doc {i}" for i in range(100)], 0.1, seed=3) == (train, held)
