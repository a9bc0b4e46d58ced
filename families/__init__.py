"""One file per model family. Each knows how to load its parts with diffusers' and transformers'
own classes, and how to write a tiny random-weight stand-in in the real directory layout.

A family module exposes:
    load(path, local_files_only, **options) -> Parts   the frozen and trainable pieces
    write_tiny(path, ...) -> str                       a stand-in for tests (not for digits)
and models.py turns Parts into a Bundle. Families never import models.py.
"""
