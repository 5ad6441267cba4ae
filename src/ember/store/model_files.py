"""The files stored beside a checkpoint's tensors, under `model/`: config.json (its
dtype set to the stored dtype), generation_config.json, the tokenizer files and the
chat template, so that `AutoConfig` / `AutoTokenizer.from_pretrained(<ckpt>/model)`
give back what the source had."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import InvalidRequestError
from ember.store.format import MODEL_DIR

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def make_config(config: PretrainedConfig | dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a config object or a plain dict with `model_type`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise InvalidRequestError("a config dict needs a 'model_type' (e.g. 'llama')", param="config")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise InvalidRequestError(f"cannot build a config: {exc}", param="config") from exc


def architecture_of(config: PretrainedConfig) -> str:
    """The model class name, e.g. "LlamaForCausalLM" (configs built in memory have none)."""
    if config.architectures:
        return str(config.architectures[0])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""))


def config_json(config: PretrainedConfig, dtype: str) -> bytes:
    """config.json with its dtype fields naming the dtype the tensors are stored in."""
    body = config.to_dict()
    body.pop("quantization_config", None)  # GGUF loads carry one; the stored tensors are dequantised
    body["architectures"] = [architecture_of(config)]
    body["dtype"] = dtype  # the key transformers >= 4.56 reads
    if "torch_dtype" in body:
        body["torch_dtype"] = dtype
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer as its save_pretrained files (relative names), with the chat
    template guaranteed to be in one of the places AutoTokenizer reads it from."""
    with tempfile.TemporaryDirectory(prefix="ember-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        out = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    template = tokenizer.chat_template
    if isinstance(template, str) and template and not _has_template(out):
        out[CHAT_TEMPLATE_FILE] = template.encode()
    return out


def _has_template(files: dict[str, bytes]) -> bool:
    if CHAT_TEMPLATE_FILE in files or "chat_template.json" in files:
        return True
    try:
        tok_config = json.loads(files.get(TOKENIZER_CONFIG_FILE, b"{}"))
    except json.JSONDecodeError:
        return False
    return bool(isinstance(tok_config, dict) and tok_config.get("chat_template"))


def model_files(
    config: PretrainedConfig,
    dtype: str,
    tokenizer: PreTrainedTokenizerBase | None,
    generation_config: bytes | None,
) -> dict[str, bytes]:
    """Everything stored under `model/`, keyed by path relative to the checkpoint;
    `generation_config` is generation_config.json's bytes."""
    files = {"config.json": config_json(config, dtype)}
    if generation_config is not None:
        files["generation_config.json"] = generation_config
    if tokenizer is not None:
        files.update(tokenizer_files(tokenizer))
    return {f"{MODEL_DIR}/{name}": data for name, data in files.items()}
