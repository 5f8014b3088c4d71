"""`Llama.build`'s options as one BuildConfig (llama/builder.py): the released signature kept, every option
checked when the config is made (before any file is read), and `Llama.build(config=...)` beside the keywords."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers import MHA, TOKENIZER, make_checkpoint
from llama import BuildConfig, Llama

# Meta's llama/generation.py (the Llama 2 release), transcribed: build(ckpt_dir, tokenizer_path, max_seq_len,
# max_batch_size, model_parallel_size=None, seed=1). Its positional order and defaults must keep working.
RELEASED = [("ckpt_dir", dataclasses.MISSING), ("tokenizer_path", dataclasses.MISSING),
            ("max_seq_len", dataclasses.MISSING), ("max_batch_size", dataclasses.MISSING),
            ("model_parallel_size", None), ("seed", 1)]


def test_the_released_arguments_come_first_with_their_defaults():
    fields = dataclasses.fields(BuildConfig)
    assert [(f.name, f.default) for f in fields[:len(RELEASED)]] == RELEASED


@pytest.mark.parametrize("name, value, extra", [
    ("max_seq_len", 0, {}), ("max_batch_size", -1, {}), ("seed", "1", {}), ("fast", "yes", {}),
    ("deterministic", 1, {}), ("dtype", "float8", {}), ("family", "llama9", {}), ("speculative", "", {}),
    ("num_draft_tokens", 0, {"speculative": "ngram"}), ("prefix_cache", "no", {}),
    ("prefix_cache_gib", -1.0, {}), ("kv_cache_gib", 0, {}),
    ("compile", True, {"speculative": "ngram"}),
])
def test_a_bad_option_is_named_before_any_file_is_read(tmp_path, name, value, extra):
    """The checkpoint folder does not exist: a ValueError (not FileNotFoundError) shows the option was checked
    first, by the config itself and through Llama.build alike."""
    options = {"ckpt_dir": str(tmp_path / "missing"), "tokenizer_path": str(tmp_path / "missing.model"),
               "max_seq_len": 64, "max_batch_size": 2, **extra, name: value}
    with pytest.raises(ValueError, match=name):
        BuildConfig(**options)
    with pytest.raises(ValueError, match=name):
        Llama.build(**options)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mha", MHA)


def test_build_from_a_config_with_overrides(ckpt):
    config = BuildConfig(str(ckpt), str(TOKENIZER), 48, 2, device="cpu", dtype="float32")
    generator = Llama.build(config=config, max_batch_size=3)
    assert (generator.max_seq_len, generator.max_batch_size) == (48, 3)
    assert generator.model.tok_embeddings.weight.dtype == torch.float32
    assert config.max_batch_size == 2  # frozen: the override made a new config
    assert Llama.build(config).max_batch_size == 2  # the config alone, by position
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_seq_len"):
        Llama.build(config=config, max_seq_len=0)


def test_build_arguments_errors_name_llama_build(ckpt):
    with pytest.raises(TypeError, match=r"Llama\.build\(\) got an unexpected keyword argument 'max_len'"):
        Llama.build(str(ckpt), str(TOKENIZER), 48, 2, max_len=4)
    with pytest.raises(TypeError, match="not both"):
        Llama.build(str(ckpt), config=BuildConfig(str(ckpt), str(TOKENIZER), 48, 2))
    with pytest.raises(ValueError, match="config must be a BuildConfig"):
        Llama.build(config={"ckpt_dir": str(ckpt)})
