"""Every command-line program of the library, one module each, all parsing their flags with argparse through
`llama.cli.ArgumentParser`. Each module has `main(argv=None) -> int` (the exit status) and `entry_point()`, which
the installed `llama-*` scripts and `python -m llama COMMAND` call. The library's own modules have no `main`:
a program only composes them. The two torchrun examples at the top of the repository keep fire, as in the
released reference.
"""
