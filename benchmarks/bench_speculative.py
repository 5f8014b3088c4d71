"""Speculative decoding against plain decoding at batch 1: tokens/s in alternation (medians), acceptance rate.

Both sides run the same model and the same greedy requests (stop tokens off, so both decode the same count),
one after the other in each round; the answers are checked to be identical. Decode tokens/s is the time of
generating n + 1 tokens minus that of generating 1 (prefill and first sample), as in bench_decode.py.

Workloads (prompts where an answer may repeat what came before):
- code-edit: a code block, then the start of the same code again, to be continued with a change;
- quote: a passage, then a sentence that starts quoting it;
- free: a plain prompt, where drafts are seldom right (what speculation costs when it does not pay).

--model demo (default): the bundled demo model (demo/fortune-llama, trained on fortunes), whose answers are
real continuations: its acceptance rates are what the prompts earn. It is tiny (5M parameters), so its step
time is Python and launch overhead, not weight reads.
--shape 1.1B: random weights at that shape (bfloat16 by default); prompt lookup seldom guesses a random model's
answer. With --copying, the same random weights but every attention and MLP output zeroed and the embeddings
and output made a bigram model of the prompt: the answer copies the prompt's text (the last successor of each
token), as an edit of a code block mostly does. The weights read per token are the same; the acceptance is by
construction. It shows what verification costs and earns at a real weight size, printed against the bandwidth
limit of plain decoding (bytes of weights per token / the read bandwidth measured in the same run).

    python benchmarks/bench_speculative.py                             # the demo model, every workload
    python benchmarks/bench_speculative.py --shape 1.1B --copying --workloads code-edit --tokens 48 --pairs 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama  # noqa: E402,F401  (before torch: the OpenMP wait policy)
import torch  # noqa: E402

from llama import Llama, ModelArgs, Tokenizer, cpu  # noqa: E402
from llama.engine import Engine  # noqa: E402
from llama.engine.speculative import ModelDrafter, NgramDrafter, Speculation  # noqa: E402
from llama.checkpoints.loading import resolve_dtype  # noqa: E402
from llama.model import PRESETS, count_parameters  # noqa: E402
from bench_decode import random_model, read_bandwidth  # noqa: E402

DEMO = ROOT / "demo" / "fortune-llama"
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"

CODE = '''def mean(values):
    total = 0
    count = 0
    for value in values:
        total = total + value
        count = count + 1
    if count == 0:
        return 0
    return total / count
'''
WORKLOADS = {
    "code-edit": f"Here is a function:\n\n{CODE}\nThe same function, with `total` renamed to `acc`:\n\n"
                 "def mean(values):\n    acc = 0\n",
    "quote": "A man who knows how to laugh at himself will never cease to be amused. The fool doth think he is "
             "wise, but the wise man knows himself to be a fool. Fortune favours the bold.\n\nIn short, as the "
             "passage says: \"The fool doth think",
    "free": "Once upon a time",
}


def progress(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def script_copying(model, prompt: list) -> None:
    """Make an unprepared model answer by copying `prompt`: attention and MLP outputs zeroed (the residual stream
    stays the token's embedding), embeddings one-hot per token state, output scoring each token's last
    successor in the prompt. Every weight is still read at every step."""
    weights = model.state_dict()
    dim, vocab = model.params.dim, model.params.vocab_size
    successor = {}
    for a, b in zip(prompt, prompt[1:]):
        successor[a] = b  # the last successor: after the prompt's last line, where an edited copy goes on
    state = {tok: i + 1 for i, tok in enumerate(successor)}  # column 0: any token not in the prompt
    if len(state) >= dim:
        raise ValueError(f"the prompt has {len(state)} distinct tokens; the copying script holds {dim - 1}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                tensor.zero_()
        emb = torch.zeros(vocab, dim)
        emb[:, 0] = 1.0
        out = torch.zeros(vocab, dim)
        out[prompt[1], 0] = 10.0
        for tok, i in state.items():
            emb[tok] = 0.0
            emb[tok, i] = 1.0
            out[successor[tok], i] = 10.0
        weights["tok_embeddings.weight"].copy_(emb)
        weights["output.weight"].copy_(out)


def runner(gen: Llama, prompt: list):
    def run(n: int) -> list:
        return gen.generate([prompt], max_gen_len=n, temperature=0.0)[0][0]
    return run


def decode_rate(run, n: int) -> float:
    start = time.perf_counter()
    run(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    run(n + 1)
    return n / (time.perf_counter() - start - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, or a checkpoint folder (with --tokenizer_path)")
    parser.add_argument("--tokenizer_path", default=None)
    parser.add_argument("--shape", default=None, choices=sorted(PRESETS), help="random weights at this shape")
    parser.add_argument("--copying", action="store_true", help="with --shape: answers copy the prompt (see above)")
    parser.add_argument("--draft", default=None, help="a draft checkpoint folder (default: prompt lookup)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--num_draft_tokens", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--pairs", type=int, default=5, help="rounds of plain and speculative, alternating")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no_bandwidth", action="store_true", help="skip measuring the read bandwidth")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device("cpu")
    dtype = resolve_dtype(opts.dtype, device)
    if opts.shape:
        args = ModelArgs(**PRESETS[opts.shape], max_seq_len=512, max_batch_size=1)
        progress(f"random {opts.shape} weights in {dtype}")
        model = random_model(args, device, dtype)
        tokenizer = Tokenizer(FIXTURE_TOKENIZER)
        if opts.copying:
            workloads = opts.workloads.split(",")
            if len(workloads) != 1:
                raise SystemExit("--copying scripts the model for one workload: give --workloads with one name")
            script_copying(model, tokenizer.encode(WORKLOADS[workloads[0]], bos=True, eos=False))
        model.prepare(cpu.kernel_for(device, dtype))
        plain = Llama(model, tokenizer)
        name = f"random {opts.shape}" + (", copying the prompt" if opts.copying else "")
    else:
        ckpt = DEMO if opts.model == "demo" else Path(opts.model)
        tok = opts.tokenizer_path or str(ckpt / "tokenizer.model")
        with contextlib.redirect_stdout(sys.stderr):
            plain = Llama.build(str(ckpt), tok, max_seq_len=512, max_batch_size=1, device="cpu", dtype=dtype)
        model, tokenizer, name = plain.model, plain.tokenizer, ckpt.name
    drafter = NgramDrafter()
    if opts.draft:
        with contextlib.redirect_stdout(sys.stderr):
            draft = Llama.build(opts.draft, str(tokenizer.path), 512, 1, device="cpu", dtype=dtype)
        drafter = ModelDrafter(draft.model)
    spec = Speculation(drafter, opts.num_draft_tokens)
    fast = Llama(model, tokenizer)
    for gen in (plain, fast):  # never stop early: both sides decode the same count
        gen.engine = Engine(gen.decode_step, tokenizer, [], speculation=spec if gen is fast else None)
    params = count_parameters(model.params)
    weight_bytes = (params - model.params.vocab_size * model.params.dim) * dtype.itemsize
    bandwidth = float("nan") if opts.no_bandwidth else read_bandwidth(device)
    result = {"model": name, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "cpu": cpu.describe(model), "drafter": drafter.name,
              "num_draft_tokens": spec.k, "tokens": opts.tokens, "pairs": opts.pairs,
              "weight_bytes_read_per_step": weight_bytes, "measured_read_bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "bandwidth_limit_tok_s": round(bandwidth / weight_bytes, 2), "workloads": {}}
    for workload in opts.workloads.split(","):
        prompt = tokenizer.encode(WORKLOADS[workload], bos=True, eos=False)
        a, b = runner(plain, prompt), runner(fast, prompt)
        same = a(opts.tokens) == b(opts.tokens)  # also the warm-up
        progress(f"{workload}: {len(prompt)} prompt tokens, {opts.pairs} rounds")
        rates, accept, per_pass = [], [], []
        for _ in range(opts.pairs):
            x = decode_rate(a, opts.tokens)
            spec.reset()
            y = decode_rate(b, opts.tokens)
            rates.append((x, y))
            accept.append(spec.acceptance or 0.0)
            per_pass.append((spec.accepted + spec.passes) / max(spec.passes, 1))
        plain_rate = statistics.median(x for x, _ in rates)
        fast_rate = statistics.median(y for _, y in rates)
        result["workloads"][workload] = {
            "identical_answers": same, "prompt_tokens": len(prompt),
            "plain_tok_s": round(plain_rate, 2), "speculative_tok_s": round(fast_rate, 2),
            "speedup": round(statistics.median(y / x for x, y in rates), 2),
            "each_round": [round(y / x, 2) for x, y in rates],
            "acceptance_rate": round(statistics.median(accept), 3),
            "tokens_per_verification": round(statistics.median(per_pass), 2),
            "speculative_vs_bandwidth_limit": round(fast_rate * weight_bytes / bandwidth, 2),
            "answer": tokenizer.decode(a(opts.tokens))[:160],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
