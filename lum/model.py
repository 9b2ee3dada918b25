"""Model presets on `transformers`' Llama, and the model folder (HF checkpoint + tokenizer + manifest).

The behaviour LM is a plain `LlamaForCausalLM` so that vLLM and transformers both load the checkpoint as is.
Presets, from laptop to production (parameter counts for a 32k vocabulary):

    preset  hidden  layers  heads  kv heads  ffn     params
    tiny        64       2      2         2    128     4.2M  (tests and the demo: trains in seconds to minutes on 2 cores)
    small      256       4      4         4    688    20M
    base       512       8      8         8   1376    58M
    1b        2048      22     32         4   5632     1.1B  (TinyLlama shapes)
    7b        4096      32     32        32  11008     6.7B  (Llama-2-7B shapes)

Most parameters of the small presets sit in the embeddings (one row per item token); the transformer body is
what grows with the preset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contracts.embeddings import MODEL_MANIFEST_FILE as MANIFEST_FILE  # the feature store reads it too
from contracts.files import file_sha256, write_json_atomic
from lum.config import PRESETS, ModelPreset  # noqa: F401  (re-exported: the presets are part of the LM's settings)


class ModelFolderError(ValueError):
    """A model folder that is missing parts or does not match what it is used with."""


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ModelFolderError(f"unknown model preset '{name}': expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def llama_config(preset: ModelPreset, vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1) -> LlamaConfig:
    """A Llama config for `preset` over a behaviour vocabulary of `vocab_size` tokens (embeddings not tied)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_positions,
        rope_theta=preset.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )


def build_model(preset_name: str, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """A freshly initialised behaviour LM. `device="meta"` builds the shapes without memory (for counting)."""
    config = llama_config(get_preset(preset_name), vocab_size)
    config._attn_implementation = "sdpa"
    if str(device) == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def data_fingerprint(*parts: Any) -> str:
    """A short hash of what a model was trained on (row counts, time range, a sample of ids...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(manifest, directory / MANIFEST_FILE, indent=2, default=str)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise ModelFolderError(f"{path} not found: {directory} is not a finished behaviour-LM folder (run `lum pretrain`)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # a damaged or hand-edited file: name it, not just the JSON position
        raise ModelFolderError(f"{path}: not a JSON manifest ({exc}); pretrain again or restore the model folder") from exc
    if not isinstance(manifest, dict):
        raise ModelFolderError(f"{path}: not a JSON manifest (a JSON object); pretrain again or restore the model folder")
    return manifest


WEIGHTS_FILE = "model.safetensors"


def weights_digest(directory: str | Path) -> str:
    """sha256 of a model folder's weights file (streamed: a 7B checkpoint is never held in memory)."""
    return file_sha256(Path(directory) / WEIGHTS_FILE)


def verify_weights(directory: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """ModelFolderError unless the weights file is the one the manifest recorded: a damaged or swapped
    `model.safetensors` would otherwise give random vectors under the same model version."""
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    expected = manifest.get("weights_sha256")
    if not isinstance(expected, str) or len(expected) != 64:
        raise ModelFolderError(f"{directory / MANIFEST_FILE} records no weights_sha256 (a folder written before weights were hashed, "
                               "or not by `lum pretrain`): pretrain it again")
    if not (directory / WEIGHTS_FILE).exists():
        raise ModelFolderError(f"{directory / WEIGHTS_FILE} not found: the model folder is incomplete")
    actual = weights_digest(directory)
    if actual != expected:
        raise ModelFolderError(f"{directory / WEIGHTS_FILE} is not the file its manifest recorded (sha256 {actual[:16]}..., manifest "
                               f"{expected[:16]}...): it was changed, damaged or copied from another model; pretrain again or restore it")
    verify_tensor_shapes(directory)


def verify_tensor_shapes(directory: Path) -> None:
    """ModelFolderError unless `model.safetensors` holds exactly the tensors, with the shapes, that `config.json`
    describes. A hash re-recorded over another model's weights passes `verify_weights`; loading it would then fail
    deep in an engine, or (a missing tensor) start from random values with no more than a warning."""
    from safetensors import safe_open

    try:
        config = LlamaConfig.from_pretrained(directory)
    except Exception as exc:  # transformers validates the fields with its own error types: blame config.json, not the weights
        raise ModelFolderError(f"{directory / 'config.json'}: not a valid model config ({exc})") from exc
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises its own SafetensorError (a subclass of neither)
        raise ModelFolderError(f"{directory}: cannot read the model ({exc})") from exc
    except Exception as exc:
        raise ModelFolderError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from exc
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)
    problems = [f"{name} missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{name} not in the config" for name in sorted(set(found) - set(expected))]
    problems += [f"{name} {list(found[name])}, config {list(shape)}" for name, shape in sorted(expected.items())
                 if name in found and found[name] != shape]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ModelFolderError(f"{directory / WEIGHTS_FILE} does not hold the tensors {directory / 'config.json'} describes ({shown}): "
                               "weights of another model; pretrain again or restore the folder")


def save_hf_tokenizer(directory: Path, vocab: list[str]) -> None:
    """A WordLevel tokenizer over the behaviour vocabulary beside the checkpoint.

    vLLM needs a tokenizer in the model folder even though prompts are passed as token ids (measured: pooling
    models fail with skip_tokenizer_init=True).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK_ITEM]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", unk_token="[UNK_ITEM]")
    fast.save_pretrained(directory)


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    manifest: dict[str, Any]


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    manifest = read_manifest(directory)
    verify_weights(directory, manifest)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return LoadedModel(model=model, manifest=manifest)


def preset_table() -> list[dict[str, Any]]:
    """Presets with their parameter counts for a 32k vocabulary (built on the meta device: no memory)."""
    rows = []
    for name, preset in PRESETS.items():
        model = build_model(name, 32_000, device="meta")
        rows.append({"preset": name, **asdict(preset), "parameters": count_parameters(model)})
    return rows
