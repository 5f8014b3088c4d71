import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "llama" / "__init__.py").read_text()).group(1)

setup(
    # The import name is `llama`; the distribution needs its own name (PyPI's `llama` is another project).
    name="llama2-reference",
    version=VERSION,
    description="Llama 2 reference inference (and Code Llama, Llama Guard, Llama 3.x): model-parallel on GPU and CPU",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["llama", "llama.model", "llama.cpu", "llama.checkpoints", "llama.programs", "llama.quant",
              "llama.serve", "llama.engine", "llama.families", "llama.tokenizers", "llama._demo"],
    # The demo model travels inside the wheel, so the examples' default works from any install.
    package_dir={"llama._demo": "demo/fortune-llama"},
    # llama/cpu/csrc: the C source of the CPU kernels, compiled at first use (llama/cpu/qkernels.py).
    package_data={"llama.cpu": ["csrc/*.c", "csrc/*.h"],
                  "llama._demo": ["consolidated.00.pth", "params.json", "tokenizer.model", "README.md",
                                  "CORPUS_LICENSE.txt"]},
    python_requires=">=3.9",
    install_requires=(HERE / "requirements.txt").read_text().split(),
    extras_require={
        # Test-only: an independent implementation to check numerics against (transformers; peft for LoRA
        # adapters; protobuf lets transformers read a SentencePiece tokenizer.model; jinja2 renders the published
        # Llama 3 chat templates), and the test runner.
        # The serving tests use real clients (openai, httpx) and a real browser (selenium driving Debian's
        # chromium and chromium-driver, which apt installs: pip cannot), so they need the serve and web extras;
        # hypothesis generates the fuzzed requests of the server's safety test; jinja2 renders published chat
        # templates for the family tests; lm-evaluation-harness's own local-completions client evaluates the server
        # (its api extra: aiohttp, tenacity); prometheus-client reads the server's /metrics; langchain-openai's
        # ChatOpenAI.bind_tools calls the server's tools; pytest-xdist runs the suite in 2 processes (README's -n 2).
        "test": ["pytest", "transformers>=4.40", "peft", "protobuf", "jinja2", "matplotlib", "openai>=1.40",
                 "httpx>=0.27", "selenium>=4.10", "fastapi>=0.110", "uvicorn>=0.30", "gradio>=6",
                 "hypothesis>=6.100", "lm-eval[api]>=0.4.9", "pytest-xdist>=3.5", "prometheus-client>=0.20",
                 "llguidance>=1.0", "jsonschema", "langchain-openai>=0.3"],
        # python -m llama.serve: the OpenAI-compatible HTTP server.
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "jinja2>=3.1"],  # jinja2: chat templates
        # python -m llama web (or llama serve --web): the chat page.
        "web": ["fastapi>=0.110", "uvicorn>=0.30", "gradio>=6"],
        # Structured output (response_format, structured_outputs): llguidance, chosen by bench_grammar.py.
        "structured": ["llguidance>=1.0"],
        # /metrics in Prometheus' format on the server.
        "metrics": ["prometheus-client>=0.20"],
        # Training the bundled demo model (scripts/train_demo.py) draws its loss curve.
        "train": ["matplotlib"],
    },
    entry_points={"console_scripts": [
        "llama-chat = llama.programs.chat:entry_point",
        "llama-reshard = llama.programs.reshard:entry_point",
        "llama-convert = llama.programs.convert:entry_point",
        "llama-quantize = llama.programs.quantize:entry_point",
        "llama-serve = llama.programs.serve:entry_point",
        "llama-web = llama.programs.web:entry_point",
    ]},
)
