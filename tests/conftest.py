import os
import sys
from pathlib import Path

import pytest

# Tests import their shared helpers as a plain module and the package from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Under pytest-xdist (README's test command runs `-n 2`) each worker is one of several processes sharing the cores:
# one torch thread per worker, and per program a test starts, so that two workers do not oversubscribe two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# The real tokenizers and transformers' Llama 3 chat-template reference, shared by the prompt-format tests (a module
# may define its own fixture of the same name, e.g. test_families' raw tiktoken tokenizer).
@pytest.fixture(scope="module")
def tok2():
    from helpers import TOKENIZER
    from llama import Tokenizer

    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def tok3():
    from helpers import LLAMA3_TOKENIZER
    from llama import Tokenizer

    return Tokenizer(LLAMA3_TOKENIZER)


@pytest.fixture(scope="module")
def ref3():
    from helpers import llama3_reference

    return llama3_reference()
