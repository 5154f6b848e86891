"""Training: streaming truncated BPTT in Lightning, crash-safe checkpoints, exact resume.

``train(recipe, name, out_dir, resume, stop_at)`` runs one invocation; `infinitrain pretrain` and
`infinitrain finetune` are its command line.
"""

from .checkpoint import ResumeError, find_checkpoint
from .module import StreamingLM
from .run import RunSummary, summarize, train

__all__ = ["ResumeError", "RunSummary", "StreamingLM", "find_checkpoint", "summarize", "train"]
