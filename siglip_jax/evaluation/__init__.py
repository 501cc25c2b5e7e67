"""Measuring a model: retrieval Recall@K, zero-shot classification and few-shot linear probes over
embeddings (retrieval, classification, fewshot), the runner that embeds the configured eval sets and
reports them (runner) and the eval.py command (command). Uses inference to embed, never training.
"""
