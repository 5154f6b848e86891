"""Evaluation of long-context checkpoints: passkey retrieval, perplexity, BookSum ROUGE, gates,
lm-evaluation-harness tasks. Import what you use from its module (``evaluation.passkey``, …):
the package itself imports nothing, so that training, which reads a few helpers here, does not
pull in ROUGE, plotting or lm-eval."""
