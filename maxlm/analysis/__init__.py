"""The research tools (docs/KNOWLEDGE.md, docs/IMPLICIT_BIAS.md): each a module of plain functions over params and
batches, which notebooks and tests call; `python -m maxlm.analyze TOOL` is their thin CLI. common.py holds what they
share.

Each tool module defines `add_parser(subparsers)` (its CLI: sets `func` to a callable taking the parsed args) and is
listed in TOOLS.
"""

# Modules (under maxlm.analysis) whose add_parser registers a `python -m maxlm.analyze` subcommand.
TOOLS: tuple[str, ...] = ("probe", "hessian", "widen", "token_difficulty", "knowledge_entropy", "resuscitate")
