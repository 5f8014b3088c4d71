"""`python -m llama.serve`, `torchrun -m llama.serve`: the server program, llama/programs/serve.py (only a shim)."""

if __name__ == "__main__":
    from ..programs.serve import entry_point

    entry_point()
