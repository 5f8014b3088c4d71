"""Train the bundled demo model: a few-million-parameter Llama on fortune-cookie quotations, on a CPU.

    python scripts/train_demo.py                       # the committed demo (Debian's `fortunes` corpus)
    python scripts/train_demo.py --corpus quotes.txt --out /tmp/demo --max_steps 20 ...   # anything else

Everything the demo is made of comes out of this one script, deterministically from --seed:

1. The corpus: a directory of fortune files (Debian's `fortunes` package by default, minus the files listed in
   --exclude) or one text file. Fortunes are separated by lines holding only ``%``; a text file without such
   lines is split at blank lines. Each fortune is one document. Duplicates are dropped, then a --heldout_frac
   share of the documents is set aside (never trained on).
2. A SentencePiece BPE tokenizer trained on the training documents, with byte fallback and Llama's special ids
   (unk 0, BOS 1, EOS 2, no pad), so ``llama.Tokenizer`` reads it unchanged.
3. The project's own ``Transformer`` (grouped-query attention by default), pretrained in float32 with AdamW and
   a warm-up + cosine learning-rate schedule on random windows of the training token stream, where each
   fortune is BOS + text + EOS.
4. A chat stage (--chat_steps): the pretrained model is fine-tuned on short dialogs written from templates
   (scripts/demo_dialogs.py: greetings, questions about itself and this project, fortunes asked for, simple
   facts), each in the Llama 2 chat format exactly as ``llama.ChatFormat`` builds it, scored on the answers
   and their EOS only, with a few windows of fortunes in every step so that it keeps its language.
5. Output, in Meta's layout: consolidated.00.pth (bfloat16), params.json, tokenizer.model; plus heldout.txt (a
   few KB of held-out fortunes, for tests), heldout_dialogs.json (dialogs worded as no training dialog is),
   metrics.json (final train and held-out losses in nats per token against the uniform baseline ln(vocab),
   each stage's figures) and the two stages' curves, training_curve.png and chat_curve.png.

``--init_from FOLDER`` starts at step 4 from a folder this script wrote (the pretraining stage's weights are
deterministic, and the chat stage starts from their bfloat16 rounding either way), which is how the committed
demo's chat stage was added to its pretrained weights without a 20-minute rerun.

The committed checkpoint comes from a fixed --max_steps; --time_budget only cuts a run short (for timing
trials), which makes its result depend on the machine's speed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
for _folder in (ROOT, Path(__file__).resolve().parent):  # the library, and demo_dialogs beside this script
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from demo_dialogs import build_dialogs  # noqa: E402
from llama.families.chat_format import B_INST, B_SYS, E_INST, E_SYS, Dialog  # noqa: E402
from llama.checkpoints.checkpoint import atomic_save, write_checkpoint  # noqa: E402
from llama.model import ModelArgs, Transformer, count_parameters  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

DEBIAN_FORTUNES = Path("/usr/share/games/fortunes")
# Files of Debian's `fortunes` package left out, and why: not prose (ascii-art, perl), not English
# (translate-me), jokes at the expense of groups of people (ethnic, men-women), a comic strip's non-sequiturs
# and quotations of recent copyrighted fiction (zippy, startrek, pratchett). The package's offensive
# collection (fortunes-off) is a separate package and never read.
DEFAULT_EXCLUDE = ("ascii-art", "perl", "translate-me", "ethnic", "men-women", "zippy", "startrek", "pratchett")
OUTPUT_FILES = ("consolidated.00.pth", "params.json", "tokenizer.model", "heldout.txt", "metrics.json",
                "training_curve.png", "chat_curve.png", "heldout_dialogs.json")


# --- corpus ------------------------------------------------------------------------------------------------


def clean(text: str) -> str:
    """One fortune as plain text: overstrikes resolved, tabs expanded, control characters and trailing
    spaces dropped, surrounding blank lines removed."""
    while "\b" in text:  # "X\bY" prints Y over X (underlined or bold words in the old files)
        new = re.sub(r"[^\b]\x08", "", text)
        text = new.replace("\b", "") if new == text else new
    text = text.expandtabs(4)
    text = "".join(ch for ch in text if ch == "\n" or ch.isprintable())
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def split_documents(text: str) -> List[str]:
    """Fortunes separated by '%' lines, or paragraphs when the text has no '%' line."""
    lines = text.replace("\r\n", "\n").split("\n")
    if any(line.strip() == "%" for line in lines):
        docs, current = [], []
        for line in lines:
            if line.strip() == "%":
                docs.append("\n".join(current))
                current = []
            else:
                current.append(line)
        docs.append("\n".join(current))
    else:
        docs = re.split(r"\n\s*\n", "\n".join(lines))
    return [d for d in (clean(doc) for doc in docs) if d.strip()]


def corpus_files(corpus: Path, exclude: Sequence[str]) -> List[Path]:
    if corpus.is_file():
        return [corpus]
    if not corpus.is_dir():
        if corpus == DEBIAN_FORTUNES:
            raise SystemExit(f"error: the default corpus {corpus} does not exist. It is Debian's `fortunes` "
                             "package: install it with `sudo apt-get install fortunes` (Debian/Ubuntu), or "
                             "give --corpus a directory of fortune files or a text file.")
        raise SystemExit(f"error: corpus {str(corpus)!r} is neither a file nor a directory")
    files = sorted(p for p in corpus.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
                   and p.suffix not in (".dat", ".u8", ".gz") and p.name not in set(exclude))
    if not files:
        raise SystemExit(f"error: no fortune files in {str(corpus)!r}"
                         + (" (install Debian's `fortunes` package)" if corpus == DEBIAN_FORTUNES else ""))
    return files


def load_corpus(corpus: Path, exclude: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Every distinct document, in file order, and the names of the files read."""
    files = corpus_files(corpus, exclude)
    seen, docs = set(), []
    for path in files:
        for doc in split_documents(path.read_text(encoding="utf-8", errors="replace")):
            key = " ".join(doc.split()).lower()
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return docs, [p.name for p in files]


def split_heldout(docs: List[str], frac: float, seed: int) -> Tuple[List[str], List[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(docs) * frac))
    if n_held >= len(docs):
        raise SystemExit(f"error: only {len(docs)} documents in the corpus: too few to hold {frac:.0%} out")
    held = sorted(order[:n_held])
    held_set = set(held)
    return [d for i, d in enumerate(docs) if i not in held_set], [docs[i] for i in held]


def write_fortunes(path: Path, docs: Sequence[str]) -> None:
    path.write_text("\n%\n".join(docs) + "\n", encoding="utf-8")


# --- tokenizer ---------------------------------------------------------------------------------------------


def train_tokenizer(docs: Sequence[str], vocab_size: int, out: Path) -> Tokenizer:
    """SentencePiece BPE with Llama's settings: byte fallback, identity normalisation, digits split, unk 0,
    BOS 1, EOS 2, no pad. Sentences are the documents' lines; newlines are byte-fallback tokens, as in Llama."""
    import sentencepiece as spm

    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return Tokenizer(path)


def token_stream(tokenizer: Tokenizer, docs: Sequence[str]) -> torch.Tensor:
    ids: List[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, bos=True, eos=True))
    return torch.tensor(ids, dtype=torch.long)


# --- model -------------------------------------------------------------------------------------------------


def build_model(args: ModelArgs, seed: int) -> Transformer:
    """A Transformer with float32 weights initialised GPT-style: N(0, 0.02), output projections of residual
    branches (wo, w2) scaled by 1/sqrt(2 * n_layers), norms 1; gradients on; rotary tables, no KV cache."""
    model = Transformer(args)
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * args.n_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            param.requires_grad_(True)
    model.setup_rope("cpu")
    return model


def optimizer_for(model: Transformer, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok_embeddings" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, max_steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine decay to min_ratio * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (seq_len + 1)-token windows covering the stream (its tail dropped), for evaluation."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise SystemExit(f"error: a token stream of {len(stream)} tokens is shorter than one window "
                         f"of {seq_len + 1}: use more text or a smaller --seq_len")
    return torch.stack([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def mean_loss(model: Transformer, batches: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) over (N, seq_len + 1) windows."""
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        chunk = batches[i: i + batch_size]
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


@torch.no_grad()
def document_loss(model: Transformer, tokenizer: Tokenizer, docs: Sequence[str], max_len: int) -> float:
    """Mean nats per token of each document scored on its own (BOS + text + EOS, at most max_len tokens),
    every token but BOS predicted: the measure tests/test_demo.py applies to heldout.txt."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tokenizer.encode(doc, bos=True, eos=True)[:max_len]])
        logits = model(ids[:, :-1])
        total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


# --- output ------------------------------------------------------------------------------------------------


def meta_state(model: Transformer, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The model's weights in Meta's naming, bfloat16, with the rope.freqs entry the released files carry."""
    state = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    state["rope.freqs"] = inv_freq.to(torch.bfloat16)
    return state


def plot_curve(path: Path, history: Dict[str, list], uniform: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    steps, losses = history["train_steps"], history["train_loss"]
    ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="train (per step)")
    if len(losses) >= 20:
        k = max(5, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="#3182bd", linewidth=1.5, label=f"train ({k}-step mean)")
    ax.plot(history["eval_steps"], history["heldout_loss"], "o-", color="#e6550d", markersize=3,
            label="held-out")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label=f"uniform baseline ln V = {uniform:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_ylim(0, uniform * 1.15)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same bytes every run
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def prepare_output(out: Path, overwrite: bool) -> Path:
    present = [name for name in OUTPUT_FILES if (out / name).exists()]
    if present and not overwrite:
        raise SystemExit(f"error: {str(out)!r} already holds {present}; pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for name in present:
        (out / name).unlink()
    return out


# --- chat stage ----------------------------------------------------------------------------------------------

IGNORE = -100  # cross_entropy's ignore_index: prompt tokens and padding are not scored


def dialog_example(tokenizer: Tokenizer, dialog: Dialog) -> Tuple[List[int], List[int]]:
    """A dialog ending with an answer as (tokens, targets) for next-token training: the exact tokens
    ChatFormat builds (BOS [INST] user [/INST] answer EOS per exchange), scored only on the answers and their
    EOS, which is what teaches the model to answer and then stop."""
    turns = [{"role": m["role"], "content": m["content"].strip()} for m in dialog]
    if turns[0]["role"] == "system":
        turns = [{"role": "user", "content": f"{B_SYS}{turns[0]['content']}{E_SYS}{turns[1]['content']}"}] + turns[2:]
    tokens: List[int] = []
    scored: List[bool] = []
    for user, answer in zip(turns[0::2], turns[1::2]):
        full = tokenizer.encode(f"{B_INST} {user['content']} {E_INST} {answer['content']} ", bos=True, eos=True)
        prompt = tokenizer.encode(f"{B_INST} {user['content']} {E_INST}", bos=True, eos=False)
        if full[:len(prompt)] != prompt:  # SentencePiece splits at the space after [/INST]: never seen
            raise ValueError(f"the prompt's tokens are not a prefix of the exchange's: {user['content']!r}")
        tokens += full
        scored += [False] * len(prompt) + [True] * (len(full) - len(prompt))
    targets = [t if keep else IGNORE for t, keep in zip(tokens[1:], scored[1:])]
    return tokens[:-1], targets


def dialog_batch(examples: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (inputs, targets) for a batch of dialog examples; padding is never scored."""
    width = max(len(tokens) for tokens, _ in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (tokens, tgt) in enumerate(examples):
        inputs[row, :len(tokens)] = torch.tensor(tokens)
        targets[row, :len(tgt)] = torch.tensor(tgt)
    return inputs, targets


@torch.no_grad()
def answer_loss(model: Transformer, examples: Sequence[Tuple[List[int], List[int]]], pad_id: int,
                batch_size: int) -> float:
    """Mean nats per scored token (the answers and their EOS) over dialog examples."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        inputs, targets = dialog_batch(examples[i: i + batch_size], pad_id)
        logits = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / count


def epoch_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator) -> List[List[int]]:
    """One epoch of dialogs in batches of similar lengths (less padding to compute), in random order: the
    dialogs are shuffled, sorted by length within runs of 16 batches, cut into batches, and those shuffled."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    run = 16 * batch_size
    order = [i for start in range(0, len(order), run)
             for i in sorted(order[start: start + run], key=lambda j: lengths[j])]
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def chat_stage(model: Transformer, tokenizer: Tokenizer, train_docs: Sequence[str], train_stream: torch.Tensor,
               opts: argparse.Namespace) -> Dict[str, object]:
    """Fine-tune the pretrained model on the dialog set (scripts/demo_dialogs.py) so that it answers in the
    Llama 2 chat format, with a few windows of fortunes in every step so that it keeps its language."""
    train_dialogs, held_dialogs = build_dialogs(train_docs, opts.seed)
    def fitting(dialogs: List[Dialog]) -> Tuple[List[Dialog], List[Tuple[List[int], List[int]]]]:
        """The dialogs of at most --seq_len tokens, and their examples."""
        pairs = [(d, dialog_example(tokenizer, d)) for d in dialogs]
        pairs = [(d, ex) for d, ex in pairs if len(ex[0]) <= opts.seq_len]
        return [d for d, _ in pairs], [ex for _, ex in pairs]

    train_dialogs, train_ex = fitting(train_dialogs)
    held_dialogs, held_ex = fitting(held_dialogs)
    if not train_ex or not held_ex:
        raise SystemExit(f"error: no dialog fits in --seq_len {opts.seq_len} tokens")
    pad_id = tokenizer.eos_id
    print(f"chat stage: {len(train_dialogs)} training and {len(held_dialogs)} held-out dialogs; held-out answer "
          f"loss before: {answer_loss(model, held_ex, pad_id, opts.batch_size):.3f}", flush=True)
    optim = optimizer_for(model, opts.chat_lr, opts.weight_decay)
    sampler = torch.Generator().manual_seed(opts.seed + 4)
    batches: List[List[int]] = []
    history: Dict[str, list] = {"steps": [], "loss": []}
    started = time.perf_counter()
    model.train()
    for step in range(opts.chat_steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opts.chat_steps, opts.chat_warmup, opts.chat_lr)
        if not batches:
            batches = epoch_batches([len(tokens) for tokens, _ in train_ex], opts.chat_batch, sampler)
        inputs, targets = dialog_batch([train_ex[i] for i in batches.pop()], pad_id)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        if opts.chat_lm_batch:
            starts = torch.randint(0, len(train_stream) - opts.seq_len, (opts.chat_lm_batch,), generator=sampler)
            batch = torch.stack([train_stream[s: s + opts.seq_len + 1] for s in starts.tolist()])
            lm_logits = model(batch[:, :-1])
            loss = loss + F.cross_entropy(lm_logits.flatten(0, 1), batch[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optim.step()
        history["steps"].append(step + 1)
        history["loss"].append(loss.item())
        if (step + 1) % opts.log_every == 0 or step + 1 == opts.chat_steps:
            elapsed = time.perf_counter() - started
            print(f"chat step {step + 1}/{opts.chat_steps}  loss {loss.item():.3f}  lr {group['lr']:.2e}  "
                  f"{elapsed:.0f} s", flush=True)
    model.eval()
    return {"steps": opts.chat_steps, "batch_size": opts.chat_batch, "lm_windows_per_step": opts.chat_lm_batch,
            "lr": opts.chat_lr, "dialogs": {"train": len(train_dialogs), "heldout": len(held_dialogs)},
            "train_answer_loss": round(answer_loss(model, train_ex[:len(held_ex)], pad_id, opts.batch_size), 4),
            "heldout_answer_loss": round(answer_loss(model, held_ex, pad_id, opts.batch_size), 4),
            "training_seconds": round(time.perf_counter() - started, 1), "history": history,
            "heldout_dialogs": held_dialogs}


def plot_chat_curve(path: Path, history: Dict[str, list], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    ax.plot(history["steps"], history["loss"], color="#9ecae1", linewidth=0.8,
            label="answer loss + fortune loss (per step)")
    ax.set_xlabel("chat step")
    ax.set_ylabel("nats per token")
    ax.set_ylim(0, None)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    path.write_bytes(buf.getvalue())


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DEBIAN_FORTUNES,
                   help="directory of fortune files, or one text file ('%%' lines or blank lines between texts)")
    p.add_argument("--exclude", default=",".join(DEFAULT_EXCLUDE), help="comma-separated file names to skip")
    p.add_argument("--out", type=Path, default=ROOT / "demo" / "fortune-llama")
    p.add_argument("--overwrite", action="store_true", help="replace this script's files already in --out")
    p.add_argument("--init_from", type=Path, default=None,
                   help="skip the pretraining stage: take the tokenizer, weights and pretraining figures from a "
                        "folder this script wrote with the same corpus and seed (may be --out itself)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--heldout_frac", type=float, default=0.05)
    p.add_argument("--heldout_sample_chars", type=int, default=12000, help="size of heldout.txt")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--multiple_of", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--time_budget", type=float, default=None,
                   help="stop after this many seconds of training (timing trials only: not deterministic)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--chat_steps", type=int, default=450, help="steps of the chat stage (0: none)")
    p.add_argument("--chat_batch", type=int, default=12, help="dialogs per chat step")
    p.add_argument("--chat_lm_batch", type=int, default=3, help="windows of fortunes per chat step")
    p.add_argument("--chat_lr", type=float, default=3e-4)
    p.add_argument("--chat_warmup", type=int, default=20)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_windows", type=int, default=16, help="held-out windows scored at each evaluation")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; results are reproducible for a given count (1: the same on any machine, "
                        "and on a shared machine 2-4x faster than 2 threads contending with other work)")
    args = p.parse_args(argv)
    if args.max_steps < 1 or args.batch_size < 1 or args.seq_len < 2 or args.eval_every < 1:
        p.error("--max_steps, --batch_size, --eval_every must be positive and --seq_len at least 2")
    if args.chat_steps < 0 or args.chat_batch < 1 or args.chat_lm_batch < 0:
        p.error("--chat_steps and --chat_lm_batch must be at least 0 and --chat_batch at least 1")
    if not 0 < args.heldout_frac < 1:
        p.error("--heldout_frac must be between 0 and 1")
    return args


PRETRAINING_KEYS = ("train_loss", "heldout_loss", "steps", "batch_size", "seq_len", "tokens_seen",
                    "training_seconds", "threads")


def read_init(folder: Path) -> Tuple[bytes, bytes, Dict[str, torch.Tensor], Dict[str, object], bytes]:
    """What --init_from takes from an earlier run's folder, read before --out is cleared (it may be the same):
    tokenizer.model, params.json, the weights, the pretraining figures and the training curve."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
        files = [(folder / name).read_bytes() for name in ("tokenizer.model", "params.json", "training_curve.png")]
    except FileNotFoundError as err:
        raise SystemExit(f"error: --init_from {str(folder)!r} is not a folder this script wrote: {err}") from None
    state = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    pretraining = metrics.get("pretraining") or {k: metrics[k] for k in PRETRAINING_KEYS}
    return files[0], files[1], state, pretraining, files[2]


def pretrain(model: Transformer, train_stream: torch.Tensor, held_windows: torch.Tensor,
             opts: argparse.Namespace, uniform: float) -> Tuple[Dict[str, list], int, float]:
    """The language-model stage: random windows of the fortunes. Returns the loss history, the steps run and
    the seconds they took."""
    optim = optimizer_for(model, opts.lr, opts.weight_decay)
    eval_held = held_windows[torch.randperm(len(held_windows), generator=torch.Generator().manual_seed(
        opts.seed + 1))[: opts.eval_windows]]
    if len(train_stream) < opts.seq_len + 2:
        raise SystemExit(f"error: {len(train_stream)} training tokens: fewer than one window of {opts.seq_len + 1}")
    sampler = torch.Generator().manual_seed(opts.seed + 2)
    offsets_range = len(train_stream) - opts.seq_len - 1
    history: Dict[str, list] = {"train_steps": [], "train_loss": [], "eval_steps": [], "heldout_loss": []}

    def evaluate(step: int) -> float:
        model.eval()
        loss = mean_loss(model, eval_held, opts.batch_size)
        model.train()
        history["eval_steps"].append(step)
        history["heldout_loss"].append(loss)
        return loss

    print(f"uniform baseline = {uniform:.3f} nats/token; held-out at step 0: {evaluate(0):.3f}", flush=True)
    train_start = time.perf_counter()
    steps_done = 0
    model.train()
    for step in range(opts.max_steps):
        if opts.time_budget is not None and time.perf_counter() - train_start > opts.time_budget:
            print(f"time budget of {opts.time_budget:.0f} s reached after {step} steps", flush=True)
            break
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opts.max_steps, opts.warmup, opts.lr)
        starts = torch.randint(0, offsets_range + 1, (opts.batch_size,), generator=sampler)
        batch = torch.stack([train_stream[s: s + opts.seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        optim.step()
        steps_done = step + 1
        history["train_steps"].append(steps_done)
        history["train_loss"].append(loss.item())
        if steps_done % opts.log_every == 0 or steps_done == opts.max_steps:
            elapsed = time.perf_counter() - train_start
            print(f"step {steps_done}/{opts.max_steps}  loss {loss.item():.3f}  lr {group['lr']:.2e}  "
                  f"{elapsed:.0f} s  ({steps_done / elapsed:.2f} steps/s, "
                  f"{steps_done * opts.batch_size * opts.seq_len / elapsed:.0f} tokens/s)", flush=True)
        if steps_done % opts.eval_every == 0 and steps_done < opts.max_steps:
            print(f"step {steps_done}: held-out loss {evaluate(steps_done):.3f}", flush=True)
    train_seconds = time.perf_counter() - train_start
    evaluate(steps_done)
    model.eval()
    return history, steps_done, train_seconds


def round_to_shipped(model: Transformer, args: ModelArgs) -> Dict[str, torch.Tensor]:
    """The bfloat16 state to ship; the model's float32 weights are set to it, so what is measured (and what a
    next stage starts from) is what ships."""
    state = meta_state(model, args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name].float())
    return state


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    opts = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked now, not after an hour of training)
    except ImportError:
        raise SystemExit("error: the training curve needs matplotlib: pip install matplotlib") from None
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()

    docs, files = load_corpus(opts.corpus, [n for n in opts.exclude.split(",") if n])
    train_docs, held_docs = split_heldout(docs, opts.heldout_frac, opts.seed)
    init = read_init(opts.init_from) if opts.init_from is not None else None
    out = prepare_output(opts.out, opts.overwrite)
    chars = sum(len(d) for d in docs)
    print(f"corpus: {len(docs)} distinct documents ({chars / 1e6:.2f} M characters) from {len(files)} file(s) "
          f"in {opts.corpus}; {len(held_docs)} held out", flush=True)

    if init is None:
        tokenizer = train_tokenizer(train_docs, opts.vocab_size, out)
    else:
        (out / "tokenizer.model").write_bytes(init[0])
        tokenizer = Tokenizer(out / "tokenizer.model")
    train_stream, held_stream = token_stream(tokenizer, train_docs), token_stream(tokenizer, held_docs)
    print(f"tokenizer: {tokenizer.n_words} pieces; {len(train_stream)} training and {len(held_stream)} held-out "
          f"tokens", flush=True)

    if init is None:
        args = ModelArgs(dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.n_heads, n_kv_heads=opts.n_kv_heads,
                         vocab_size=tokenizer.n_words, multiple_of=opts.multiple_of, max_seq_len=opts.seq_len,
                         max_batch_size=max(opts.batch_size, opts.chat_batch))
    else:
        args = ModelArgs.from_params(json.loads(init[1]), max_seq_len=opts.seq_len,
                                     max_batch_size=max(opts.batch_size, opts.chat_batch))
    args.validate()
    model = build_model(args, opts.seed)
    n_params = count_parameters(args)
    print(f"model: {n_params / 1e6:.2f} M parameters (dim {args.dim}, {args.n_layers} layers, {args.n_heads} "
          f"heads, {args.kv_heads} KV heads, FFN {args.ffn_hidden_dim}, vocab {args.vocab_size})", flush=True)

    uniform = math.log(tokenizer.n_words)
    held_windows = windows(held_stream, opts.seq_len)
    train_windows = windows(train_stream, opts.seq_len)
    train_sample = train_windows[torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(
        opts.seed + 3))[:len(held_windows)]]
    if init is None:
        history, steps_done, train_seconds = pretrain(model, train_stream, held_windows, opts, uniform)
        # Final numbers on the float32 weights over as much text as the held-out split has.
        pretraining = {"train_loss": round(mean_loss(model, train_sample, opts.batch_size), 4),
                       "heldout_loss": round(mean_loss(model, held_windows, opts.batch_size), 4),
                       "steps": steps_done, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                       "tokens_seen": steps_done * opts.batch_size * opts.seq_len,
                       "training_seconds": round(train_seconds, 1), "threads": opts.threads}
        state = round_to_shipped(model, args)
        plot_curve(out / "training_curve.png", history, uniform,
                   f"{n_params / 1e6:.1f} M-parameter Llama on {len(train_docs)} fortunes, seed {opts.seed}: "
                   f"held-out {pretraining['heldout_loss']:.2f} nats/token")
    else:
        _, _, init_state, pretraining, curve = init
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(init_state[name].float())
        model.eval()
        state = round_to_shipped(model, args)
        (out / "training_curve.png").write_bytes(curve)
        print(f"pretraining stage taken from {opts.init_from}: {pretraining['steps']} steps, held-out "
              f"{pretraining['heldout_loss']:.3f}", flush=True)

    chat: Optional[Dict[str, object]] = None
    if opts.chat_steps:
        chat = chat_stage(model, tokenizer, train_docs, train_stream, opts)
        plot_chat_curve(out / "chat_curve.png", chat.pop("history"),
                        f"chat stage: {chat['dialogs']['train']} dialogs, held-out answer loss "
                        f"{chat['heldout_answer_loss']:.2f} nats/token")
        atomic_save(chat.pop("heldout_dialogs"), out / "heldout_dialogs.json")
        final_train = mean_loss(model, train_sample, opts.batch_size)
        final_held = mean_loss(model, held_windows, opts.batch_size)
        state = round_to_shipped(model, args)
    else:
        final_train, final_held = pretraining["train_loss"], pretraining["heldout_loss"]

    sample: List[str] = []
    for doc in held_docs:
        if sum(len(d) + 3 for d in sample) + len(doc) > opts.heldout_sample_chars and sample:
            break
        sample.append(doc)
    write_fortunes(out / "heldout.txt", sample)
    sample_loss = document_loss(model, tokenizer, sample, opts.seq_len)

    write_checkpoint(out, args.to_params(), iter([state]))
    metrics = {
        "unit": "nats per token",
        "uniform_baseline": round(uniform, 4),
        "train_loss": round(final_train, 4),
        "heldout_loss": round(final_held, 4),
        "heldout_txt_loss_bf16": round(sample_loss, 4),
        "train_tokens_scored": int(train_sample[:, 1:].numel()),
        "heldout_tokens_scored": int(held_windows[:, 1:].numel()),
        "heldout_txt_documents": len(sample),
        "train_tokens": int(len(train_stream)),
        "parameters": n_params,
        "seed": opts.seed,
        "corpus_files": files,
        "documents": {"train": len(train_docs), "heldout": len(held_docs)},
        "pretraining": pretraining,
        "chat": chat,
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": opts.threads,
    }
    atomic_save(metrics, out / "metrics.json")
    print(f"done in {metrics['total_seconds']:.0f} s: train {final_train:.3f}, held-out {final_held:.3f}, "
          f"heldout.txt (bf16) {sample_loss:.3f} nats/token vs uniform {uniform:.3f}"
          + (f"; held-out answers {chat['heldout_answer_loss']:.3f}" if chat else "") + f"; wrote {out}",
          flush=True)
    return metrics


if __name__ == "__main__":
    main()
