"""Export a model directory to the Hugging Face format.

An exported directory loads with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)``:

    config.json                  the ModelConfig fields, model_type, auto_map, dtype
    model.safetensors            weights named ``model.<core name>``; above ``max_shard_size``,
                                 model-0000X-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json       BOS/EOS/PAD ids of the tokenizer
    tokenizer.json, tokenizer_config.json, …   the checkpoint's tokenizer files
    configuration_infini.py, modeling_infini.py   the thin transformers wrapper
    config.py, transformer.py, …                  infinitrain's core model files, verbatim
    README.md                    model card

The wrapper imports the core files with relative imports, so the exported model runs the code
infinitrain trains and evaluates; there is no second implementation to drift.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import model as core_package
from ..layout import RECIPE_FILE
from ..model import InfiniTransformer, ModelConfig
from ..model_dir import load_model_dir, match_umask, tokenizer_path
from .files import check_new_dir, checked_tokenizer, copy_tokenizer_files
from .model_card import model_card

MODEL_TYPE = "infini_llama"
ARCHITECTURE = "InfiniForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_infini.InfiniConfig",
    "AutoModelForCausalLM": "modeling_infini.InfiniForCausalLM",
}
WEIGHT_PREFIX = "model."
"""The wrapper holds the core model as ``self.model``."""
WRAPPER_FILES = ("configuration_infini.py", "modeling_infini.py")
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
"""The resolved recipe a training checkpoint holds (see infinitrain.training.checkpoint)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(ValueError):
    """The export cannot be written; the message says why and what to do."""


def export_hf(model_dir: str | Path, out_dir: str | Path, dtype: str = "fp32",
              max_shard_size: int | str = "5GB") -> Path:
    """Write the model directory ``model_dir`` (every training checkpoint is one) to ``out_dir``.

    Checks everything before writing anything, so a refused export leaves at most an empty
    directory.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_new_dir(out)
    model = load_model_dir(model_dir)
    tokenizer_dir = tokenizer_path(model_dir)
    if tokenizer_dir is None:
        raise ExportError(f"{model_dir}: has no tokenizer/ directory; an exported model ships "
                          "with its tokenizer")
    tokenizer = checked_tokenizer(tokenizer_dir, model.config.vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    try:  # first: the size is parsed only here
        _write_weights(out, model, DTYPES[dtype], max_shard_size)
    except ValueError as error:
        raise ExportError(f"max_shard_size {max_shard_size!r}: {error}") from None
    copy_tokenizer_files(tokenizer_dir, out)
    for source in [*core_files(), *(Path(__file__).parent / name for name in WRAPPER_FILES)]:
        shutil.copyfile(source, out / source.name)
    _write_config(out, model.config, DTYPES[dtype])
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id).save_pretrained(out)
    recipe = next((path.read_text() for path in (model_dir / RECIPE_FILE,
                                                 model_dir.parent / RECIPE_FILE)
                   if path.is_file()), None)
    (out / "README.md").write_text(model_card(model, dtype, recipe, model_dir.name))
    return out


def core_files() -> list[Path]:
    """The core model's module files (its ``__init__`` stays behind: transformers makes its own)."""
    package = Path(core_package.__file__).parent
    return sorted(path for path in package.glob("*.py") if path.name != "__init__.py")


def _write_config(out: Path, config: ModelConfig, dtype: torch.dtype) -> None:
    import transformers

    values = {
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        "model_type": MODEL_TYPE,
        **config.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "transformers_version": transformers.__version__,
    }
    (out / HF_CONFIG_FILE).write_text(json.dumps(values, indent=2) + "\n")


def _write_weights(out: Path, model: InfiniTransformer, dtype: torch.dtype,
                   max_shard_size: int | str) -> None:
    from huggingface_hub import save_torch_state_dict

    weights = {WEIGHT_PREFIX + name: tensor.detach().to(dtype)
               for name, tensor in model.state_dict().items()}
    if model.config.tie_embeddings:
        del weights[WEIGHT_PREFIX + "lm_head.weight"]  # transformers re-ties it on load
    save_torch_state_dict(weights, out, max_shard_size=max_shard_size,
                          metadata={"format": "pt"})
    for shard in out.glob("model*.safetensors"):
        match_umask(shard)


def export_config(path: Path) -> dict | None:
    """The ``config.json`` values of an ``infinitrain export hf`` directory, or None when ``path``
    is not one."""
    config_file = path / HF_CONFIG_FILE
    if not config_file.is_file():
        return None
    values = json.loads(config_file.read_text())
    return values if values.get("model_type") == MODEL_TYPE else None
