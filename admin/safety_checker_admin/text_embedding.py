"""Embed a phrase with a CLIP text encoder, in the space the served checker's concepts live in.

The safety checker's vision tower is CLIP ViT-L/14's, so its concepts and
image embeddings are comparable with the text features of
`openai/clip-vit-large-patch14` (transformers' CLIPModel.get_text_features,
after CLIPTokenizer). Before trusting a CLIP model, `embed_text` checks that
its vision tower really is the served checker's: a few fixed probe images must
get the same image embedding from it as from the server.

Needs torch and transformers; imported only here, only when a phrase is added.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from safety_checker_client import spec

# Probe images must embed to within this cosine of the server's embeddings.
SAME_SPACE_COSINE = 0.99


class TextEmbeddingError(RuntimeError):
    """The phrase could not be embedded in the served checker's space."""


def load_clip(clip_model: str):
    try:
        import torch  # noqa: F401
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError as error:
        raise TextEmbeddingError(
            f"--text needs torch and transformers ({error}); pip install torch transformers"
        ) from None
    try:
        model = CLIPModel.from_pretrained(clip_model).float().eval()
        tokenizer = CLIPTokenizer.from_pretrained(clip_model)
    except Exception as error:  # transformers raises many types for a missing or unreachable model
        text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise TextEmbeddingError(
            f"cannot load the CLIP model {clip_model!r} (hub id or local directory with the "
            f"model and its tokenizer): {text}"
        ) from None
    return model, tokenizer


def _features(output):
    """transformers 4 returns the projected features; 5 wraps them in an output's pooler_output."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


def probe_pixels() -> np.ndarray:
    """A few fixed, varied images (gradients and stripes) as pixel_values."""
    from safety_checker_client.preprocess import preprocess

    grid = np.linspace(0.0, 1.0, spec.IMAGE_SIZE, dtype=np.float32)
    horizontal = np.broadcast_to(grid[np.newaxis, :, np.newaxis], (spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3))
    stripes = (np.sin(grid * 40.0)[:, np.newaxis, np.newaxis] > 0).astype(np.float32) * np.ones((1, spec.IMAGE_SIZE, 3))
    colour = np.ones((spec.IMAGE_SIZE, spec.IMAGE_SIZE, 3), dtype=np.float32) * np.array([0.9, 0.3, 0.1])
    return preprocess([horizontal.copy(), stripes.astype(np.float32), colour.astype(np.float32)])


def check_same_space(model, client, clip_model: str) -> None:
    """Refuse a CLIP model whose vision tower is not the served checker's."""
    import torch

    pixels = probe_pixels()
    served = np.stack([r.image_embeds for r in client.check_batch(pixels)]).astype(np.float64)
    with torch.no_grad():
        local = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels))).double().numpy()
    if local.shape != served.shape:
        raise TextEmbeddingError(
            f"the CLIP model {clip_model!r} embeds images into {local.shape[-1]} values, the "
            f"served checker into {served.shape[-1]}: not the checker's CLIP"
        )
    cos = np.sum(local * served, axis=1) / (np.linalg.norm(local, axis=1) * np.linalg.norm(served, axis=1))
    if np.min(cos) < SAME_SPACE_COSINE:
        raise TextEmbeddingError(
            f"the CLIP model {clip_model!r} is not the one the served checker was built from: its image embeddings "
            f"of probe images differ from the server's (cosine {np.min(cos):.4f} < {SAME_SPACE_COSINE}), so its text "
            "embeddings would not be comparable with the served image embeddings"
        )


def embed_text(phrase: str, clip_model: str, client: Optional[object] = None) -> np.ndarray:
    """The phrase's CLIP text features (float64, not normalised); checks the space against `client`'s server."""
    import torch

    model, tokenizer = load_clip(clip_model)
    if client is not None:
        check_same_space(model, client, clip_model)
    max_length = int(model.config.text_config.max_position_embeddings)
    tokens = tokenizer([phrase], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        features = _features(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
    return features[0].double().numpy()
