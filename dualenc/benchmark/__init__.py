"""Evaluation as LAION's CLIP_benchmark does it: its dataset layouts, class names and templates, its metrics
(zero-shot classification, retrieval recall, linear probe), its results JSON, and a dualenc model type for it."""
