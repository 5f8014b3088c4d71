"""`python -m llama.web`: the old spelling of `python -m llama web`, the server with its chat page (the program is
llama/programs/web.py)."""

if __name__ == "__main__":
    from .programs.web import entry_point

    entry_point()
