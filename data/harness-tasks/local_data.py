"""Load this directory's JSONL files for the task YAMLs next to it.

lm-eval hands ``dataset_kwargs: {data_files: ...}`` to ``datasets.load_dataset``, which resolves a
relative path against the current directory, not the YAML's: ``dataset_path: json`` with
``data_files: choice.jsonl`` works only when lm-eval runs from this directory. A ``!function``
is resolved next to its YAML, so ``custom_dataset: !function local_data.jsonl`` finds this module
from anywhere, and the module finds the files next to itself.
"""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def jsonl(data_files: dict[str, str], **_) -> datasets.DatasetDict:
    """``{split: file name}`` in this directory as a DatasetDict; lm-eval also passes the task's
    metadata (version, model arguments) as keywords, which are not needed here."""
    return datasets.DatasetDict({split: datasets.Dataset.from_json(str(HERE / name), split=split)
                                 for split, name in data_files.items()})
