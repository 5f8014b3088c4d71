"""What the command-line programs share: the demo default, checks before loading, the argument parser and its
help, and one way to fail.

Every program shows a user's mistake as one line, `error: ...`, printed by rank 0 alone, with exit status 2;
Ctrl-C as one line with exit status 130; and never a traceback for either. Output into a pipe that closes
early (`--help | head`) ends quietly. The programs themselves live in llama/programs/ and parse their flags
with `ArgumentParser` below; the two torchrun examples keep fire, as in the released reference (`run`).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple

from ..model import distributed
from .. import families, quant
from ..families.chat_format import ChatFormat, Dialog, validate_dialog
from ..model.kv_int8 import KV_DTYPES
from ..model.transformer import check_positive_int
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ParamError, SamplingParams
from ..tokenizer import Tokenizer
from .suggest import suggest, unknown_flag  # noqa: F401  (cli.suggest: the programs' one guess)
from . import interrupt

_PACKAGE = Path(__file__).resolve().parents[1]  # llama/
_CHECKOUT_DEMO = _PACKAGE.parent / "demo" / "fortune-llama"
_PACKAGED_DEMO = _PACKAGE / "_demo"


def _demo_dir() -> Path:
    """The bundled demo model: the checkout's demo/fortune-llama, or the copy an installed wheel carries."""
    for folder in (_CHECKOUT_DEMO, _PACKAGED_DEMO):
        if (folder / "consolidated.00.pth").is_file():
            return folder
    raise FileNotFoundError("the bundled demo model is not installed (it ships with a clone of the repository "
                            "and with its wheel): give --ckpt_dir and --tokenizer_path")


def resolve_checkpoint(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str]:
    """The user's paths, or the bundled demo model when neither is given (saying so in one line)."""
    if ckpt_dir is None and tokenizer_path is None:
        folder = _demo_dir()
        distributed.print0(f"No --ckpt_dir/--tokenizer_path given: using the bundled demo model in {folder} "
                           "(a tiny model trained on fortune quotations, not Llama 2).")
        return str(folder), str(folder / "tokenizer.model")
    if ckpt_dir is None:
        raise ValueError("--ckpt_dir is missing: give both --ckpt_dir and --tokenizer_path, or neither for the demo")
    if tokenizer_path is None:
        candidate = _own_tokenizer(ckpt_dir)  # a Hugging Face folder carries its own
        if candidate is not None:
            return str(ckpt_dir), str(candidate)
        raise ValueError("--tokenizer_path is missing: give both --ckpt_dir and --tokenizer_path, or neither for "
                         "the demo")
    return str(ckpt_dir), str(tokenizer_path)


def _own_tokenizer(ckpt_dir: str, above: bool = False) -> Optional[Path]:
    """The tokenizer.model a checkpoint folder carries: in it, in its original/ (Hugging Face's Llama 3 repos
    keep Meta's tiktoken file there), or with `above` in the folder above (download.sh's Llama 2 layout)."""
    folder = Path(ckpt_dir)
    candidates = [folder / "tokenizer.model", folder / "original" / "tokenizer.model"]
    candidates += [folder.resolve().parent / "tokenizer.model"] if above else []
    return next((c for c in candidates if c.is_file()), None)


def resolve_shield(shield: Optional[str]) -> Optional[Tuple[str, str]]:
    """--shield CKPT: the Llama Guard checkpoint folder and its tokenizer.model (in it or the folder above)."""
    if shield is None:
        return None
    if not Path(shield).is_dir():
        raise FileNotFoundError(f"--shield {shield!r}: no such checkpoint folder (give a Llama Guard checkpoint)")
    tokenizer = _own_tokenizer(shield, above=True)
    if tokenizer is None:
        raise FileNotFoundError(f"--shield {shield!r}: no tokenizer.model in it, in its original/ or the folder above")
    return str(shield), str(tokenizer)


def chat_format_for(tokenizer_path: str, family: Optional[str] = None) -> ChatFormat:
    """The chat format a tokenizer implies (before the checkpoint is read): for checks that must not wait."""
    tokenizer = Tokenizer(tokenizer_path)
    return families.detect(tokenizer, requested=family).chat_format(tokenizer)


def check_before_loading(tokenizer_path: str, max_seq_len: int, max_batch_size: int, temperature: float,
                         top_p: float, max_gen_len: Optional[int] = None, prompts: Sequence[str] = (),
                         dialogs: Sequence[Dialog] = (), family: Optional[str] = None) -> None:
    """What a script can check in a moment, so that a bad flag never waits for the weights to load: the sizes,
    the sampling flags, and whether the script's prompts or dialogs fit --max_batch_size and --max_seq_len."""
    check_positive_int("--max_seq_len", max_seq_len)
    check_positive_int("--max_batch_size", max_batch_size)
    try:
        SamplingParams(temperature=temperature, top_p=top_p).check()  # the ranges of llama.engine.params.RANGES
    except ParamError as err:
        raise ValueError(f"--{err}") from None
    if max_gen_len is not None:
        check_positive_int("--max_gen_len", max_gen_len)
    count = len(prompts) + len(dialogs)
    if count > max_batch_size:
        raise ValueError(f"the script sends {count} prompts at once: --max_batch_size must be at least {count}, "
                         f"got {max_batch_size}")
    formatter = chat_format_for(tokenizer_path, family)
    lengths = [len(formatter.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    for i, dialog in enumerate(dialogs):
        validate_dialog(dialog, index=i)
        lengths.append(len(formatter.encode_dialog_prompt(dialog)))
    if lengths and max(lengths) >= max_seq_len:
        raise ValueError(f"--max_seq_len {max_seq_len} leaves no room to answer: the longest prompt has "
                         f"{max(lengths)} tokens")


def flag(name: str) -> Tuple[str, ...]:
    """A flag's spellings: `--max_seq_len`, as the released scripts write them, and `--max-seq-len`, as most
    programs do (--help shows the first)."""
    dashed = name.replace("_", "-")
    return (f"--{name}",) + ((f"--{dashed}",) if dashed != name else ())


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature and --top_p with the library's defaults (their ranges are checked by check_before_loading,
    from llama.engine.params.RANGES, as the server checks a request's)."""
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="sampling temperature, 0..2; 0 is greedy")
    parser.add_argument(*flag("top_p"), type=float, default=DEFAULT_TOP_P,
                        help="nucleus sampling: draw from the most likely tokens whose probabilities add up to this")


def add_speculation_flags(parser: argparse.ArgumentParser) -> None:
    """--speculative and --num_draft_tokens, for the programs that decode with drafts."""
    parser.add_argument("--speculative", default=None, metavar="ngram|DRAFT_DIR",
                        help="speculative decoding: ngram (prompt lookup) or a draft checkpoint folder with the same "
                             "tokenizer; the same answers, faster where drafts are right")
    parser.add_argument(*flag("num_draft_tokens"), type=int, default=4, help="drafts checked per step")


def add_model_flags(parser: argparse.ArgumentParser, what: str = "checkpoint folder",
                    seed_help: str = "seed of the sampler (the same seed and inputs give the same answers)",
                    many_loras: bool = False) -> None:
    """The flags of every program that loads a model for generation, as the example scripts name them
    (many_loras: --lora also takes NAME=PATH pairs, adapters served beside the base: the server's)."""
    parser.add_argument(*flag("ckpt_dir"), default=None,
                        help=f"{what}, Meta's layout or Hugging Face's (default, with --tokenizer_path unset: the "
                             "bundled demo model)")
    parser.add_argument(*flag("tokenizer_path"), default=None,
                        help="the tokenizer.model file (default for a Hugging Face folder: its own)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda where there is a GPU)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="weights' and activations' dtype (default: the fastest the device supports)")
    parser.add_argument("--seed", type=int, default=1, help=seed_help)
    if many_loras:
        parser.add_argument("--lora", nargs="+", default=None, metavar="[NAME=]PATH",
                            help="PEFT LoRA adapter folders: one PATH is merged into the weights (the fast path for "
                                 "one adapter); NAME=PATH ... serve each beside the unmerged base, picked by a "
                                 "request's 'model'")
    else:
        parser.add_argument("--lora", default=None, help="a PEFT LoRA adapter folder to merge into the weights")
    parser.add_argument("--quantize", default=None, choices=tuple(quant.SCHEMES),
                        help="weight-only quantization at load (none for a quantized checkpoint)")
    parser.add_argument(*flag("group_size"), type=int, default=None,
                        help=f"int4's inputs per scale: {', '.join(map(str, quant.GROUP_SIZES))} "
                             f"(default {quant.DEFAULT_GROUP_SIZE})")
    parser.add_argument("--kv_dtype", default="auto", choices=("auto",) + KV_DTYPES,
                        help="how the KV cache stores keys and values: auto (the model's dtype) or int8 (about half "
                             "the memory: twice the tokens per GiB; see docs/serving.md, the paged KV cache)")
    parser.add_argument("--family", default=None, choices=families.NAMES,
                        help="the model's family (default: detected from the checkpoint)")
    parser.add_argument("--verbose", action=Verbose, help=Verbose.HELP)


def rewrite_parser(command: str, description: str, usage: str, src_help: str, dst_help: str) -> "ArgumentParser":
    """The parser of a program that writes one checkpoint folder from another (reshard, quantize, convert):
    SRC_DIR and DST_DIR, then the program's own flags."""
    parser = ArgumentParser(f"python -m llama {command}", description, usage=usage)
    parser.add_argument("src_dir", help=src_help)
    parser.add_argument("dst_dir", help=dst_help)
    return parser


def run_rewrite(write: Callable[[Callable[[str], None]], object], what: str = "shard") -> int:
    """Run `write(log)`, the log printed line by line, as `guarded` does; Ctrl-C says nothing was left half
    written (the writers rename each file into place when complete)."""
    return guarded(lambda: write(lambda message: print(message, flush=True)),
                   interrupted=f"interrupted: no {what} was left under its final name")


class Verbose(argparse.Action):
    """--verbose: the load reports its detail, as LLAMA_LOG=debug does (set as the flag is parsed)."""

    HELP = "report the load's detail: the CPU's flags and the kernels the layers run (as LLAMA_LOG=debug)"

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..checkpoints.loading import set_verbose

        set_verbose()
        setattr(namespace, self.dest, True)


def guarded(fn: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run `fn` and return the exit status: 0; 2 for an input error (`error: ...`), 1 for an OS error such as
    a full disk, 130 for Ctrl-C (`interrupted`). The one line is printed by rank 0 alone. A closed output pipe
    is left to `exit_with`."""
    interrupt.hand_back()  # the work begins: Ctrl-C now raises KeyboardInterrupt, to stop it cleanly
    try:
        fn()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return _say(f"error: {err}", 2)
    except BrokenPipeError:
        raise
    except OSError as err:
        return _say(f"error: {err}", 1)
    except KeyboardInterrupt:
        return _say(f"\n{interrupted}", 130)
    return 0


def _say(message: str, status: int) -> int:
    distributed.print0(message, file=sys.stderr)
    if not distributed._is_rank0():
        # Every rank meets the same mistake at the same moment, but only rank 0 says it: the others wait a
        # moment before exiting, or torchrun, seeing them fail first, would end rank 0 before it had spoken.
        time.sleep(2.0)
    return status


def exit_with(program: Callable[[], Optional[int]]) -> NoReturn:
    """Run a program and exit with its status (argparse's own exits included). When the reader of its output
    goes away (`llama-chat --help | head`), it ends quietly with status 141, as a program killed by SIGPIPE
    does, instead of a BrokenPipeError traceback."""
    try:
        try:
            status = program()
        except SystemExit as done:  # --help, and the parser's one-line errors
            status = done.code
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that this flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        status = 141
    sys.exit(status)


def program_name(default: str) -> str:
    """The name the user ran the program by, for usage lines: an installed script (`llama-chat`), the name
    `python -m llama` gave it (`python -m llama chat`), a script file (`chat.py`), else `default`."""
    invoked = sys.argv[0] if sys.argv else ""
    if invoked.startswith("python -m "):
        return invoked
    name = Path(invoked).name
    inside_package = Path(invoked).resolve().parent.is_relative_to(_PACKAGE)
    if not name or name in ("__main__.py", "-c") or inside_package:
        return default
    return name


class HelpFormatter(argparse.HelpFormatter):
    """Each flag on its own line with its type and default, its explanation indented below: the same help as
    the fire scripts' (`_usage`)."""

    def _format_action(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            return super()._format_action(action)
        if not action.option_strings:  # a positional argument
            head = f"  {action.dest}"
        else:
            long = [o for o in action.option_strings if o.startswith("--")]
            short = [o for o in action.option_strings if not o.startswith("--")]
            head = f"  {', '.join(short + long[:1])}"  # a flag's dashed spelling is accepted, not listed
            if action.nargs == 0:
                pass  # a switch: no value
            elif action.choices is not None:
                head += f" ({' or '.join(map(str, action.choices))}"
                head += "" if action.default in (None, argparse.SUPPRESS) else f", default {action.default!r}"
                head += ")"
            else:
                kind = getattr(action.type, "__name__", "str")
                head += f" ({kind}"
                head += "" if action.default in (None, argparse.SUPPRESS) else f", default {action.default!r}"
                head += ")"
        text = action.help % {"prog": self._prog} if action.help else ""
        lines = textwrap.wrap(text, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
        return "\n".join([head, *lines]) + "\n"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the programs' manners: the name the program was run by in its usage line, no abbreviated
    flags (`--max_b` is not `--max_batch_size`), every flag under both spellings (`--max_seq_len`,
    `--max-seq-len`), each flag's type and default in --help, and a mistake shown as one line, `error: ...` (a
    mistyped flag with the closest real one, `suggest`), exit status 2, from rank 0 alone."""

    def __init__(self, default_prog: str, description: str, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=program_name(default_prog), description=description, **kwargs)

    def add_argument(self, *names: str, **kwargs) -> argparse.Action:
        """argparse's, with the other spelling of each long flag added (dashes for underscores, and back)."""
        spelled = list(names)
        for name in names:
            if name.startswith("--"):
                for other in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if other not in spelled:
                        spelled.append(other)
        return super().add_argument(*spelled, **kwargs)

    def format_help(self) -> str:
        text = super().format_help()
        return text.replace("\noptions:\n", "\nflags:\n")

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = self._unknown(message.split(": ", 1)[1].split())
        elif message.startswith("argument --"):  # "argument --port: invalid int value: 'x'"
            flag_names, _, rest = message[len("argument "):].partition(": ")
            message = f"{flag_names.split('/')[0]}: {rest}"
        _say(f"error: {message}", 2)
        sys.exit(2)

    def _unknown(self, words: Sequence[str]) -> str:
        flags = [w for w in words if w.startswith("-")]
        if not flags:
            return f"unexpected argument(s) {' '.join(words)} (--help lists the arguments)"
        return unknown_flag(flags[0].split("=", 1)[0],
                            [o for o in self._option_string_actions if o.startswith("--")])


def run(main: Callable) -> None:
    """fire.Fire(main), for the torchrun example scripts: --help printed plainly from main's signature and
    docstring, unknown or misspelt flags refused before anything runs, and errors and Ctrl-C shown as one line
    (see `guarded`)."""
    import fire

    argv = sys.argv[1:]
    if any(arg in ("-h", "--help", "-help") for arg in argv):
        exit_with(lambda: print(_usage(main)))
    status = guarded(lambda: _check_flags(main, argv))
    exit_with(lambda: status or guarded(lambda: fire.Fire(main, command=argv, name=Path(sys.argv[0]).name)))


def _flag_names(main: Callable) -> List[str]:
    return list(inspect.signature(main).parameters)


def _check_flags(main: Callable, argv: Sequence[str]) -> None:
    names = _flag_names(main)
    params = inspect.signature(main).parameters
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        negated = name[2:] if name.startswith("no") else None  # fire's --noflag for a boolean
        if name in names or (negated in names and params[negated].default in (True, False)):
            continue
        raise ValueError(unknown_flag(arg.split("=", 1)[0], [f"--{n}" for n in names]))


def _type_name(annotation) -> str:
    if isinstance(annotation, str):  # postponed annotations
        annotation = annotation.replace("Optional[", "").rstrip("]")
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _usage(main: Callable) -> str:
    """The program's help: its module docstring's first paragraph, then each flag with its type, default and
    the line of main's docstring that starts with the flag's name."""
    module = sys.modules.get(main.__module__)
    summary = (inspect.getdoc(module) or "").split("\n\n")[0]
    notes = {}
    for line in (inspect.getdoc(main) or "").splitlines():
        key, sep, text = line.partition(":")
        if sep and key.strip().isidentifier():
            notes[key.strip()] = text.strip()
        elif notes and line.startswith(" "):
            last = list(notes)[-1]
            notes[last] += " " + line.strip()
    lines = [summary, "", f"usage: {program_name(Path(sys.argv[0]).name)} [--flag value ...]", "", "flags:"]
    for name, param in inspect.signature(main).parameters.items():
        default = "" if param.default is inspect.Parameter.empty else f", default {param.default!r}"
        lines.append(f"  --{name} ({_type_name(param.annotation)}{default})")
        if name in notes:
            lines.append(f"      {notes[name]}")
    return "\n".join(lines)
