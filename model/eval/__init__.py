"""Evaluation of UMG-CLIP checkpoints: zero-shot classification, retrieval (``umg eval``).

Modules: ``metrics`` (pure metric functions), ``prompts`` (prompt-ensembled class embeddings),
``datasets`` (ImageFolder / COCO-captions readers), ``zeroshot``, ``retrieval``, ``report`` (the result
dict, JSON + markdown files).
"""
