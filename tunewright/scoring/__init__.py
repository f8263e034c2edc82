"""Scoring answers and text: task metrics, safety (toxicity, PII leaks, refusals), the PII and secret detectors,
the optional LLM judge, programmatic rewards (`rewards`) and learned ones (`reward_model`), and the sentence
embeddings stage 7 compares traffic with."""
