"""lm-evaluation-harness tasks on an Infini-Transformer, through its Hugging Face export.

The model is evaluated by lm-eval's own ``HFLM`` over the directory ``infinitrain export hf``
writes (a checkpoint is exported to a temporary directory first), so what is measured is what
users ship: the transformers wrapper, its tokenizer, its ``generate``. lm-eval is an optional
dependency (``pip install 'infinitrain[harness]'``), imported only here.

Context length. An Infini model has no positional limit, so ``max_length`` defaults to 2^20
tokens: a rolling-perplexity document is read in one forward pass, through the memory, and a
generation prompt is not truncated. lm-eval scores a longer document in independent windows of
``max_length`` tokens, each from an empty memory; one forward pass holds its logits,
``max_length × vocab`` floats per batch row, so lower it for very long documents.

BOS. Our models are trained on documents that start with BOS, so every request is read with
exactly one BOS in front. Plain lm-eval cannot do that with our tokenizer, which adds BOS when it
encodes: lm-eval's default (``add_bos_token`` unset, i.e. the tokenizer decides) puts BOS before
multiple-choice contexts and generation prompts, but rolling-perplexity windows then start with
lm-eval's own prefix token *and* the tokenizer's, BOS BOS text, and the second BOS is scored as
the document's first token; ``add_bos_token=False`` fixes rolling windows and drops BOS everywhere
else. :func:`harness_model` therefore turns the tokenizer's BOS off only while lm-eval builds
rolling windows. With the ``lm_eval`` command itself, pass ``--model_args add_bos_token=True``
for multiple-choice and generation tasks and ``add_bos_token=False`` for rolling perplexity tasks
(wikitext, pg19, ...), in two runs.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..export import export_hf
from ..export.hf import export_config
from ..inference.loading import resolve_model_path

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

DEFAULT_MAX_LENGTH = 1 << 20
"""Tokens per forward pass: whole documents and prompts, see the module docstring."""
EXTRA = "pip install 'infinitrain[harness]'"


class HarnessError(ValueError):
    """lm-eval is missing or a task is unknown; the message says which and what to do."""


def require_lm_eval() -> None:
    """Fail in one line, naming the extra that installs it, when lm-eval cannot be imported."""
    try:
        import lm_eval.evaluator
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as error:
        if error.name is None or error.name.split(".")[0] == "lm_eval":
            raise HarnessError(f"lm-eval is not installed: {EXTRA}") from None
        raise HarnessError(f"{error.name}, needed by lm-eval, is not installed: {EXTRA}"
                           ) from None


def task_manager(tasks: Sequence[str], include_path: Path | None = None) -> TaskManager:
    """lm-eval's index of tasks, checked to know every name in ``tasks``.

    Indexing lm-eval's own ~15,000 task files takes seconds (15 s on a busy 2-core machine), so
    when ``include_path`` holds every requested task, group and tag, and every task its groups
    name, only ``include_path`` is indexed; otherwise lm-eval's tasks are searched too.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise HarnessError(f"include path {include_path}: no such directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if _indexed(local.task_index, tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    for name in tasks:
        if name not in manager.task_index and not Path(name).is_file():
            where = "lm-eval's tasks" + ("" if include_path is None else f" or {include_path}")
            raise HarnessError(f"{name!r}: no such task, group or tag in {where}")
    return manager


def _indexed(index: dict[str, Any], names: Sequence[str]) -> bool:
    """Whether ``index`` knows every name, and every task that the groups among them name."""
    for name in names:
        entry = index.get(name)
        if entry is None:
            return False
        config = entry.cfg or {}
        if "group" in config:
            children = [child if isinstance(child, str) else child.get("task")
                        for child in config.get("task", [])]
            if not all(isinstance(child, str) for child in children):
                return False  # an inline task: let lm-eval's full index resolve it
            if not _indexed(index, children):
                return False
    return True


@contextlib.contextmanager
def hf_export(model_path: str | Path, dtype: torch.dtype = torch.float32) -> Iterator[Path]:
    """The Hugging Face directory of ``model_path``: the path itself when it is an export, else a
    temporary export of the checkpoint (a run directory's ``latest``), removed on exit.

    The export holds bf16 weights when the model is to run in bf16 (half the disk space, and
    the same weights once loaded), float32 otherwise.
    """
    path = resolve_model_path(model_path)
    if export_config(path) is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="infinitrain-harness-") as scratch:
        yield export_hf(path, Path(scratch) / path.name,
                        dtype="bf16" if dtype == torch.bfloat16 else "fp32")


def harness_model(hf_dir: Path, *, batch_size: int = 1, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32,
                  max_length: int = DEFAULT_MAX_LENGTH) -> HFLM:
    """lm-eval's ``HFLM`` over the model and tokenizer transformers loads from ``hf_dir``, reading
    every request after exactly one BOS (see the module docstring).

    HFLM is given the loaded instances, so it never looks for a hub name; it keeps the model on
    the device it is on.
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class OneBosHFLM(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self.add_bos_token = False  # lm-eval starts each window with its own BOS here
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token = True

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    return OneBosHFLM(pretrained=model.to(device).eval(), tokenizer=tokenizer, backend="causal",
                      batch_size=batch_size, max_length=max_length, add_bos_token=True,
                      device=str(device))


def run_harness(model_path: str | Path, tasks: Sequence[str], include_path: Path | None = None,
                *, batch_size: int = 1, limit: int | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                max_length: int = DEFAULT_MAX_LENGTH, log_samples: bool = False,
                manager: TaskManager | None = None) -> dict:
    """lm-eval's results for ``tasks`` (names of tasks, groups or tags) on the model at
    ``model_path`` (anything ``--model`` accepts), as ``simple_evaluate`` returns them.

    ``limit`` scores the first N documents of each task; ``log_samples`` adds every request and
    response under ``"samples"``; ``manager`` is an index from :func:`task_manager`, to not
    build it twice.
    """
    if manager is None:
        manager = task_manager(tasks, include_path)
    from lm_eval.evaluator import simple_evaluate

    with hf_export(model_path, dtype) as hf_dir:
        lm = harness_model(hf_dir, batch_size=batch_size, device=device, dtype=dtype,
                           max_length=max_length)
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                                  limit=limit, log_samples=log_samples)
    results["config"]["model"] = str(model_path)  # not the temporary export's path
    return results


@dataclass(frozen=True)
class Metric:
    """One figure of lm-eval's results."""

    task: str
    docs: int | None
    """Documents scored (None for a group: its tasks say)."""
    name: str
    filter: str
    """lm-eval's name for how responses were post-processed ('none': as generated)."""
    value: float
    stderr: float | None
    """None where lm-eval computes none (perplexities)."""
    higher_is_better: bool | None


def metrics(results: dict) -> list[Metric]:
    """The figures of ``results`` (as :func:`run_harness` returns them), task by task."""
    rows = []
    for task, values in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        docs = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{name}_stderr,{filter_name}")
            rows.append(Metric(task, docs, name, filter_name, float(value),
                               float(stderr) if isinstance(stderr, (int, float)) else None,
                               better.get(name)))
    return rows


def jsonable(results: dict) -> dict:
    """``results`` with what JSON cannot hold (task functions, numpy scalars) made strings and
    numbers, as lm-eval writes its own result files."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))
