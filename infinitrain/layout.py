"""Where things live on disk: the one place that names a run directory's files.

```
runs/NAME/                          a run directory (checkpoint.out_dir, --out-dir)
  .lock                             RUN_LOCK: held by the run writing here
  latest                            LATEST_POINTER: the newest complete checkpoint's name
  step-00000300/                    a checkpoint, step_name(300); also a model directory:
    model_config.json               MODEL_CONFIG_FILE
    model.safetensors               WEIGHTS_FILE
    tokenizer/                      TOKENIZER_DIR
    recipe.yaml                     RECIPE_FILE: the resolved recipe that ran
    trainer.ckpt                    TRAINER_STATE: optimizer, scheduler, loops
    streams/                        STREAMS_DIR: each rank's memories and data position
    checkpoint.json                 MANIFEST_FILE: every file's size and SHA-256, written last
  .tmp-step-00000300/               TMP_STEP_PREFIX: a checkpoint being written
  logs/tensorboard/                 LOG_DIR, TENSORBOARD_DIR
  logs/csv/from-step-00000000/      CSV_DIR, csv_version(0): one CSV log per invocation
```

Formats defined by others keep their own names where they are written: a Hugging Face export's
(``export/hf.py``) and a tokenizer's (``data/tokenizer.py``).
"""

from __future__ import annotations

from pathlib import Path

RUN_LOCK = ".lock"
LATEST_POINTER = "latest"
STEP_PREFIX = "step-"
TMP_STEP_PREFIX = ".tmp-step-"
MODEL_CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
RECIPE_FILE = "recipe.yaml"
TRAINER_STATE = "trainer.ckpt"
STREAMS_DIR = "streams"
MANIFEST_FILE = "checkpoint.json"
LOG_DIR = Path("logs")
TENSORBOARD_DIR = "tensorboard"
CSV_DIR = "csv"
CSV_VERSION_PREFIX = "from-step-"


def step_name(step: int) -> str:
    """The checkpoint directory of an optimizer step: step-00000300."""
    return f"{STEP_PREFIX}{step:08d}"


def csv_version(start_step: int) -> str:
    """The CSV log folder of the invocation that starts at ``start_step``: from-step-00000000."""
    return f"{CSV_VERSION_PREFIX}{start_step:08d}"
