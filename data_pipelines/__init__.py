"""Data: sources, tokenization, the token store, grain pipelines, mixtures, PCFG corpora.

The trainer uses build_train_iterator / build_eval_batches / describe; `python -m maxlm.data` wraps prepare.
"""

if __name__ != "maxlm.data_pipelines":  # a bare `import data_pipelines` from the checkout's root
  import maxlm
  maxlm.step_aside(__name__)
else:
  from maxlm.data_pipelines.batches import DataIterator
  from maxlm.data_pipelines.batches import SourceInfo
  from maxlm.data_pipelines.batches import eval_windows
  from maxlm.data_pipelines.batches import make_batch
  from maxlm.data_pipelines.pipeline import build_eval_batches
  from maxlm.data_pipelines.pipeline import build_train_iterator
  from maxlm.data_pipelines.pipeline import describe
  from maxlm.data_pipelines.pcfg import Grammar
  from maxlm.data_pipelines.pcfg import load_grammar
  from maxlm.data_pipelines.pcfg import parse_grammar
  from maxlm.data_pipelines.prepare import inspect_store
  from maxlm.data_pipelines.prepare import prepare
  from maxlm.data_pipelines.token_store import TokenStore

__all__ = [
    "DataIterator", "SourceInfo", "build_eval_batches", "build_train_iterator", "describe", "eval_windows",
    "make_batch",
    "Grammar", "load_grammar", "parse_grammar", "inspect_store", "prepare", "TokenStore",
]
