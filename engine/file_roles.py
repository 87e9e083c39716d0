"""What a model file holds, read from its tensor names and shapes (or a GGUF's architecture), never
from its file name: people keep the names they downloaded (`t5-v1_1-xxl-encoder-Q8_0.gguf`,
`qwen_3_4b.safetensors`, `ViT-L-14-TEXT-detail-improved-hiT-GmP-TE-only-HF.safetensors`), so a models/
folder is searched by contents. Only the header is read: no tensor is loaded."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FileRole = Literal[
    "transformer",
    "flux2_transformer",
    "vae",
    "flux2_vae",
    "clip_l",
    "clip_g",
    "t5xxl",
    "qwen3",
    "other",
    "unreadable",
]

# GGUF architectures (general.architecture) -> role: city96 writes "t5encoder" for T5 encoders and
# "flux" for transformers; llama.cpp writes "qwen3" for Qwen3 language models.
_GGUF_ROLES: dict[str, FileRole] = {
    "t5encoder": "t5xxl",
    "t5": "t5xxl",
    "flux": "transformer",
    "qwen3": "qwen3",
}


UMT5_VOCABULARY = 250_000  # umT5's 256,384 and anything near it: not T5 v1.1's 32,128
OTHER_CLIP_WIDTHS = (1024,)  # CLIP-H / SD2's OpenCLIP (CLIP-G's 1280 has a role of its own)


@dataclass(frozen=True)
class FileContents:
    """A file's role and the words doctor and the loader's notes use for it."""

    role: FileRole
    says: str


def _ends(keys: Mapping[str, tuple[int, ...]], suffix: str) -> str | None:
    return next((k for k in keys if k == suffix or k.endswith("." + suffix)), None)


def _classify(keys: Mapping[str, tuple[int, ...]]) -> FileContents:
    """The role a file's tensor names (with their shapes) show. Any prefix is allowed (`transformer.`,
    `text_model.`, `model.`), as each tool saves them under its own."""
    if any("double_blocks." in k or "transformer_blocks." in k for k in keys):
        if _ends(keys, "single_stream_modulation.lin.weight") or _ends(
            keys, "single_stream_modulation.linear.weight"
        ):
            return FileContents("flux2_transformer", "a FLUX.2 transformer")
        return FileContents("transformer", "a FLUX.1 transformer")
    if _ends(keys, "block.0.layer.0.SelfAttention.q.weight"):
        # T5 v1.1 has 32,128 tokens; umT5 (Wan's encoder, the same layout) 256,384: no FLUX T5-XXL.
        embedding = _ends(keys, "shared.weight") or _ends(keys, "encoder.embed_tokens.weight")
        vocabulary = keys[embedding][0] if embedding is not None else 0
        if vocabulary >= UMT5_VOCABULARY:
            return FileContents("other", f"a umT5 encoder ({vocabulary} tokens), not FLUX's T5-XXL")
        return FileContents("t5xxl", "a T5 text encoder")
    token_embedding = _ends(keys, "embeddings.token_embedding.weight")
    if token_embedding is not None:
        width = keys[token_embedding][-1]
        if width == 1280:
            return FileContents("clip_g", "a CLIP-G text encoder (SDXL's, not FLUX's)")
        if width in OTHER_CLIP_WIDTHS:
            return FileContents("other", f"a CLIP text encoder {width} wide (CLIP-L is 768)")
        return FileContents("clip_l", f"a CLIP text encoder, {width} wide")
    q_norm = _ends(keys, "layers.0.self_attn.q_norm.weight")
    embed = _ends(keys, "embed_tokens.weight")
    if q_norm is not None and embed is not None:
        return FileContents("qwen3", f"a Qwen3 text encoder, {keys[embed][-1]} wide (FLUX.2 klein's)")
    conv_in = _ends(keys, "decoder.conv_in.weight")
    if conv_in is not None and len(keys[conv_in]) == 4:
        channels = keys[conv_in][1]
        if channels == 16:
            return FileContents("vae", "a 16-channel VAE (FLUX.1's)")
        if channels == 32 and _ends(keys, "bn.running_mean"):
            return FileContents("flux2_vae", "a 32-channel VAE (FLUX.2's)")
        return FileContents("other", f"a {channels}-channel VAE (not FLUX's)")
    return FileContents("other", "no FLUX part fluxbot knows")


def read_contents(path: Path) -> FileContents:
    """What `path` holds; a file that cannot be parsed is 'unreadable' (the loader names its error)."""
    try:
        if path.suffix == ".gguf":
            return _gguf_contents(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception:  # any parser error means the same here: not a file to choose
        return FileContents("unreadable", "not a readable file")
    return _classify(shapes)


def _gguf_contents(path: Path) -> FileContents:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[-1]).decode() if field is not None else "unknown"
    role = _GGUF_ROLES.get(architecture)
    if role is None:
        return FileContents("other", f"a GGUF {architecture!r} model")
    kinds = sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) > 1})
    names = {"t5xxl": "a T5 text encoder", "transformer": "a FLUX transformer", "qwen3": "a Qwen3 model"}
    return FileContents(role, f"{names[role]} (GGUF {'/'.join(kinds)})")


def find_by_contents(
    contents: Mapping[Path, FileContents], role: FileRole, name_rank: Callable[[Path], int | None]
) -> Path | None:
    """The file among `contents` that holds `role`. When several do (t5xxl_fp16 and t5xxl_fp8), the one
    its name points to first (`name_rank`, lower is better), then the first in sorted order. When none
    does, a file the name alone points to, unless it clearly holds another part: loading it then says
    what is wrong with it (an unreadable file is named, not skipped in silence)."""
    holding = [p for p, held in contents.items() if held.role == role]
    if not holding:
        unknown = ("other", "unreadable")
        holding = [p for p, held in contents.items() if held.role in unknown and name_rank(p) is not None]
    if not holding:
        return None
    return min(holding, key=lambda p: (_rank(name_rank(p)), str(p)))


def _rank(rank: int | None) -> int:
    return rank if rank is not None else 1_000_000
