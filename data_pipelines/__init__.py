"""Data: sources, tokenization, the token store, grain pipelines, mixtures, PCFG corpora."""
