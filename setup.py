from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llama",
    version="0.1.0",
    description="Llama 2 reference inference: model-parallel on GPU and CPU, exact and fast",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["llama", "llama.*"]),
    python_requires=">=3.9",
    install_requires=Path(__file__).with_name("requirements.txt").read_text().split(),
    extras_require={
        # Test-only: an independent implementation to check numerics against (transformers; peft for LoRA
        # adapters; protobuf lets transformers read a SentencePiece tokenizer.model), and the test runner.
        # The serving tests use real clients (openai, httpx) and a real browser (selenium driving Debian's
        # chromium and chromium-driver, which apt installs: pip cannot), so they need the serve and web extras.
        "test": ["pytest", "transformers>=4.40", "peft", "protobuf", "matplotlib", "openai>=1.40", "httpx>=0.27",
                 "selenium>=4.10", "fastapi>=0.110", "uvicorn>=0.30", "gradio>=6"],
        # python -m llama.serve: the OpenAI-compatible HTTP server.
        "serve": ["fastapi>=0.110", "uvicorn>=0.30"],
        # python -m llama.web (or llama.serve --web): the chat page.
        "web": ["fastapi>=0.110", "uvicorn>=0.30", "gradio>=6"],
        # Training the bundled demo model (scripts/train_demo.py) draws its loss curve.
        "train": ["matplotlib"],
    },
)
