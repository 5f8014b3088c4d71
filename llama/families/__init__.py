"""The Llama families this library runs, and which one a checkpoint is.

One module per family holds all that is particular to it (tokenizer kind, chat format, stop tokens, RoPE,
vocabulary, context, generation defaults, Hugging Face bits): llama2, codellama, llama3, llamaguard. The rest
of the library asks the family.

Detection (`detect`) reads what the files say: the tokenizer file's format (a SentencePiece protobuf or
tiktoken's base64 lines), params.json's keys (or those Hugging Face's config.json maps to: rope_theta,
use_scaled_rope...) and the vocabulary. tiktoken means Llama 3; SentencePiece with rope_theta 1e6 or the
infilling pieces means Code Llama (width 8192: Code Llama 70B, with 70B Instruct's chat format); other
SentencePiece checkpoints are Llama 2. Llama Guard looks like its base model and is chosen by name ('llamaguard'
alone: the version the files say, see llamaguard.version_for). A `family=` name overrides detection, but must fit
the files; anything that fits no family is a ValueError naming what was found.

Beside the families: the chat prompts a generator uses (prompting.py: a Jinja chat template, templates.py, or the
family's Meta format) and tool calling (tools.py).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional

from ..tokenizers import BaseTokenizer
from ..model.args import ArchSpec
from .base import Family, HFSpec


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "").replace(" ", "")


from .codellama import FAMILY as CODELLAMA, FAMILY_70B as CODELLAMA70B
from .llama2 import FAMILY as LLAMA2
from .llama3 import FAMILY as LLAMA3
from .llamaguard import V1 as LLAMAGUARD1, V2 as LLAMAGUARD2, V3 as LLAMAGUARD3, V3_1B as LLAMAGUARD3_1B, \
    LlamaGuard, Moderation, version_for

FAMILIES: Dict[str, Family] = {_key(f.name): f for f in (LLAMA2, CODELLAMA, CODELLAMA70B, LLAMA3, LLAMAGUARD1,
                                                         LLAMAGUARD2, LLAMAGUARD3, LLAMAGUARD3_1B)}
# what family= takes (llamaguard alone: its version from the files, see llamaguard.version_for)
NAMES = ("llama2", "codellama", "codellama-70b", "llama3", "llamaguard", "llamaguard1", "llamaguard2",
         "llamaguard3", "llamaguard3-1b")
_DETECTION_ORDER = (LLAMA3, CODELLAMA70B, CODELLAMA, LLAMA2)


def register(family: Family, detect_first: bool = True) -> Family:
    """Add a family defined outside llama/families (a plugin module, a test): from then on family=, --family
    (every program's, the server's) and conversion take its name, and detection tries it before the built-in
    families when `detect_first`. The family's own module is the only file it needs."""
    global NAMES, _DETECTION_ORDER
    if not family.name or _key(family.name) in FAMILIES or family.name in NAMES:
        raise ValueError(f"a family needs a new name; {family.name!r} is taken or empty (known: {list(NAMES)})")
    FAMILIES[_key(family.name)] = family
    NAMES = (*NAMES, family.name)
    if detect_first:
        _DETECTION_ORDER = (family, *_DETECTION_ORDER)
    return family


def hf_spec(config: Mapping[str, Any]) -> HFSpec:
    """The Hugging Face layout a config.json is in (its `architectures`, else its `model_type`), among the
    families' (Family.hf); a ValueError naming the field when no family reads it (the caller names the file)."""
    specs = {f.hf.architecture: f.hf for f in FAMILIES.values()}
    types = {s.model_type: s for s in specs.values()}
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and len(archs) == 1 and archs[0] in specs):
        raise _unsupported("architectures", archs, sorted(specs))
    spec = specs[archs[0]] if archs is not None else types.get(config.get("model_type", "llama"))
    if spec is None or config.get("model_type", spec.model_type) != spec.model_type:
        raise _unsupported("model_type", config.get("model_type"), sorted(types))
    return spec


def rope_family(rope_type: Optional[str] = None) -> Optional[Family]:
    """The family whose RoPE scaling config.json calls `rope_type` (Family.hf_rope_type); None: the first family
    with a scaling. None when no family has it."""
    return next((f for f in FAMILIES.values() if f.hf_rope_type is not None and rope_type in (None, f.hf_rope_type)),
                None)


def _unsupported(field: str, value: Any, known: List[str]) -> ValueError:
    return ValueError(f"{field} = {json.dumps(value)} is not supported: only {known} (the families' "
                      "Hugging Face architectures) are")


def arch_options(spec: HFSpec) -> List[ArchSpec]:
    """The architecture options the families read through `spec` declare: what its config.json may ask for."""
    found: List[ArchSpec] = []
    for family in FAMILIES.values():
        if family.hf == spec and family.arch not in found:
            found.append(family.arch)
    return found


def _found(params: Mapping[str, Any], tokenizer: BaseTokenizer, arch: Optional[ArchSpec] = None) -> str:
    keys = {k: params[k] for k in ("vocab_size", "rope_theta", "use_scaled_rope", "n_kv_heads") if k in params}
    held = "" if arch is None else f", weights with {arch.describe()}"
    return f"tokenizer {tokenizer.path!r} ({tokenizer.kind}, {tokenizer.n_words} tokens), params {keys}{held}"


def get(name: str, tokenizer: Optional[BaseTokenizer] = None, params: Optional[Mapping[str, Any]] = None) -> Family:
    """The family called `name` (one of NAMES); 'llamaguard' alone is the version the tokenizer and params.json
    say (llamaguard.version_for)."""
    if isinstance(name, Family):
        return name
    key = _key(name)
    if key == "llamaguard":
        return version_for(tokenizer, params)
    if key not in FAMILIES:
        raise ValueError(f"unknown family {name!r}: choose one of {list(NAMES)}")
    return FAMILIES[key]


def detect(tokenizer: BaseTokenizer, params: Optional[Mapping[str, Any]] = None,
           requested: Optional[str] = None, arch: Optional[ArchSpec] = None) -> Family:
    """The family of a checkpoint (its params.json keys, Meta's names, and the architecture options its files
    hold, if known) read with `tokenizer`; `requested` (family=, --family) overrides detection but must fit."""
    params = params or {}
    if requested is not None:
        family = get(requested, tokenizer, params)
        problem = family.check_tokenizer(tokenizer) or family.check_params(params) or \
            (family.check_arch(arch) if arch is not None else None)
        if problem:
            raise ValueError(f"family {requested!r} does not fit this checkpoint: {problem} (found "
                             f"{_found(params, tokenizer, arch)})")
        return family
    for family in _DETECTION_ORDER:
        if family.matches(params, tokenizer) and (arch is None or family.check_arch(arch) is None):
            return family
    raise ValueError(f"no Llama family fits this checkpoint: found {_found(params, tokenizer, arch)}. Known families: "
                     f"{list(NAMES)} (Llama 3 needs its tiktoken tokenizer.model, Llama 2 and Code Llama a "
                     "SentencePiece one, and only Llama 3.1 and later use_scaled_rope)")


__all__ = ["Family", "HFSpec", "hf_spec", "arch_options", "rope_family", "FAMILIES", "NAMES", "LlamaGuard", "Moderation", "detect", "get", "register", "LLAMA2",
           "CODELLAMA", "CODELLAMA70B", "LLAMA3", "LLAMAGUARD1", "LLAMAGUARD2", "LLAMAGUARD3", "LLAMAGUARD3_1B"]
