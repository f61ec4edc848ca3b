"""Data preparation: sources (synthetic, hub, local files) -> formats -> canonical JSONL per role.

sources loads raw rows, formats (with mapping and paper_formats) maps them to the canonical forms of
schema, prepare writes each role's files; synthetic generates rows, onpolicy samples rejected answers.
"""
