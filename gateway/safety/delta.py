"""A fine-tuned encoder shipped as a small delta over the bundled one.

``safegate safety train`` fine-tunes all-MiniLM-L6-v2 end to end with LoRA on every
linear layer of every transformer block. What ships is only the low-rank factors (a few
MB of safetensors): for each adapted ``torch.nn.Linear`` the file holds ``<name>.lora_A``
[r, in] and ``<name>.lora_B`` [out, r], and the metadata holds the ``scaling``. Loading
merges them into the base weights once (``W += scaling * B @ A``), so inference costs
exactly what the plain encoder costs and the ONNX export sees an ordinary BERT.

The file's sha256 is checked against the model card before anything is merged: a
weights file that differs from the one the card describes (a zeroed matrix inside a valid
file, say) is refused, and the member that needs it does not load (fail closed).

Exceptions::

    DeltaError            the file is missing, inconsistent, or not the one the card names
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "safegate-encoder-delta/1"


class DeltaError(Exception):
    """The delta file is missing, of another format, or not the one its card names."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected_sha256: str) -> None:
    """Raise ``DeltaError`` unless ``path`` exists and hashes to ``expected_sha256``."""
    if not path.is_file():
        raise DeltaError(f"weights file {path.name} is missing")
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise DeltaError(
            f"weights file {path.name} has sha256 {actual[:16]}..., the model card says "
            f"{expected_sha256[:16]}...; refusing to load weights the card does not describe"
        )


def save(factors: dict[str, torch.Tensor], path: Path, *, scaling: float) -> None:
    """Write LoRA factors (``<linear>.lora_A`` / ``<linear>.lora_B``) as float16."""
    tensors = {
        name: tensor.detach().to(torch.float16).contiguous() for name, tensor in factors.items()
    }
    save_file(tensors, str(path), metadata={"format": FORMAT, "scaling": repr(scaling)})


def merge_into(model: torch.nn.Module, path: Path) -> int:
    """Merge the factors in ``path`` into ``model``'s linear layers; return how many."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise DeltaError(f"{path.name} is not a {FORMAT} file")
        try:
            scaling = float(metadata["scaling"])
        except (KeyError, ValueError) as error:
            raise DeltaError(f"{path.name} has no valid scaling in its metadata") from error
        stored = list(handle.keys())  # safetensors' handle, not a dict
        names = sorted({key.rsplit(".", 1)[0] for key in stored})
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in names:
                linear = modules.get(name)
                if not isinstance(linear, torch.nn.Linear):
                    raise DeltaError(f"{path.name} adapts {name!r}, which is not a linear layer")
                a = handle.get_tensor(f"{name}.lora_A").float()
                b = handle.get_tensor(f"{name}.lora_B").float()
                if b.shape[0] != linear.out_features or a.shape[1] != linear.in_features:
                    raise DeltaError(f"{path.name}: factors of {name!r} do not fit its shape")
                linear.weight += scaling * (b @ a)
    return len(names)
