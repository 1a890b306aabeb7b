"""Tiny models for the custom-concept tests, and the synthetic pictures they are tried on.

A random tiny vision tower maps every picture to nearly the same direction
(its embeddings share one large common component), so cosines would say
nothing about what a picture shows. The concept checker therefore gets a
projection fitted to families of synthetic pictures (a linear discriminant,
orthogonal to the mean feature), like the parity checker gets thresholds
fitted to its inputs: still tiny and random, but its embedding
tells horizontal black-and-white stripes of a period around 20 pixels from
checkerboards, vertical stripes, gradients, blobs, noise and photographs.
Its built-in thresholds are set so high that no built-in concept fires on
these pictures: whatever flags one of them in the tests is a custom concept.

The tiny CLIP shares that vision tower and projection; its text projection is
fitted so that a few phrases land on the embedding of what they name
("stripes" on the stripes' mean embedding, and so on), so a text concept on
it means something too. Its tokenizer is built from a hand-written
vocab.json and merges.txt (letters only, a few merges).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from fixtures.checkers import build_checker, clip_config, save_checker
from fixtures.photos import photo, photos

SIZE = 256
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
# (period, phase) of horizontal black-and-white stripes.
STRIPE_EXAMPLES = ((16, 0), (20, 3), (24, 5))  # what a concept is made from
STRIPE_MATCHES = ((18, 7), (22, 1), (19, 4), (21, 9))  # other pictures of the same thing
PROJECTION_DIM = 16
CONCEPT_SEED = 11
# Phrases the tiny CLIP knows, and what each names.
PHRASES = ("stripes", "checkerboard", "a cat", "noise")


def _grid():
    return np.mgrid[0:SIZE, 0:SIZE]


def stripes(period: int, phase: int = 0, vertical: bool = False, colours=(BLACK, WHITE)) -> np.ndarray:
    yy, xx = _grid()
    t = xx if vertical else yy
    mask = ((t + phase) // (period // 2)) % 2 == 0
    return np.where(mask[..., None], np.array(colours[0], np.uint8), np.array(colours[1], np.uint8)).astype(np.uint8)


def checkerboard(cell: int, offset: int = 0, colours=(BLACK, WHITE)) -> np.ndarray:
    yy, xx = _grid()
    mask = (((xx + offset) // cell) + ((yy + offset) // cell)) % 2 == 0
    return np.where(mask[..., None], np.array(colours[0], np.uint8), np.array(colours[1], np.uint8)).astype(np.uint8)


def _colour(rng) -> np.ndarray:
    return rng.integers(0, 256, 3)


def gradient(rng) -> np.ndarray:
    yy, xx = _grid()
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy) / (SIZE * 1.5) + 0.5, 0, 1)[..., None]
    return (t * _colour(rng) + (1 - t) * _colour(rng)).astype(np.uint8)


def blobs(rng) -> np.ndarray:
    yy, xx = _grid()
    image = np.full((SIZE, SIZE, 3), _colour(rng), np.uint8)
    for _ in range(5):
        cx, cy = rng.integers(0, SIZE, 2)
        radius = int(rng.integers(15, 60))
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < radius * radius] = _colour(rng)
    return image


def noise(rng) -> np.ndarray:
    return rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def stripe_examples() -> List[np.ndarray]:
    return [stripes(p, ph) for p, ph in STRIPE_EXAMPLES]


def stripe_matches() -> List[np.ndarray]:
    return [stripes(p, ph) for p, ph in STRIPE_MATCHES]


def other_pictures(seed: int = 3) -> Dict[str, np.ndarray]:
    """Pictures that are not horizontal stripes: none of them may fire a stripes concept."""
    rng = np.random.default_rng(seed)
    pictures = {f"checkerboard_{c}": checkerboard(c, o) for c, o in ((8, 0), (12, 3), (16, 0), (24, 5), (32, 0))}
    pictures.update({f"vertical_{p}": stripes(p, ph, vertical=True) for p, ph in ((16, 0), (20, 3), (24, 5))})
    pictures.update({f"gradient_{i}": gradient(rng) for i in range(3)})
    pictures.update({f"blobs_{i}": blobs(rng) for i in range(3)})
    pictures.update({f"noise_{i}": noise(rng) for i in range(2)})
    pictures.update(photos(("astronaut", "coffee", "chelsea", "rocket", "camera")))
    return pictures


def _families(seed: int = 1) -> Tuple[List[np.ndarray], np.ndarray]:
    """Synthetic pictures in seven families (the labels), for fitting the projection."""
    rng = np.random.default_rng(seed)
    pictures, labels = [], []
    for _ in range(25):
        pictures += [
            stripes(int(rng.integers(14, 28)), int(rng.integers(0, 20))),
            stripes(
                int(rng.integers(10, 40)), int(rng.integers(0, 20)), vertical=True, colours=(_colour(rng), _colour(rng))
            ),
            checkerboard(int(rng.integers(6, 40)), int(rng.integers(0, 20)), (_colour(rng), _colour(rng))),
            gradient(rng),
            blobs(rng),
            noise(rng),
            stripes(int(rng.integers(10, 40)), int(rng.integers(0, 20)), colours=(_colour(rng), _colour(rng))),
        ]
        labels += list(range(7))
    return pictures, np.array(labels)


def embed(checker, images: Sequence[np.ndarray]) -> np.ndarray:
    """image_embeds as diffusers computes them (float64 copies)."""
    from safety_checker_client.preprocess import preprocess

    with torch.no_grad():
        pixels = torch.from_numpy(preprocess(list(images)))
        return checker.visual_projection(checker.vision_model(pixels)[1]).double().numpy()


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def build_concept_checker(seed: int = CONCEPT_SEED):
    """A tiny checker whose projection separates the synthetic pictures, and whose built-ins never fire.

    The projection is a linear discriminant of the picture families (the
    directions that best separate the families relative to the spread within
    each), whitened, plus a few principal directions at a tenth of the weight,
    all made orthogonal to the mean feature so no common component dominates.
    """
    from safety_checker_client.preprocess import preprocess

    checker = build_checker(
        seed=seed, projection_dim=PROJECTION_DIM, concept_thresholds=[0.99] * 17, special_thresholds=[0.99] * 3
    )
    pictures, labels = _families()
    with torch.no_grad():
        pooled = checker.vision_model(torch.from_numpy(preprocess(pictures)))[1].double().numpy()
    mean = pooled.mean(axis=0)
    centred = pooled - mean
    families = np.unique(labels)
    means = np.stack([centred[labels == k].mean(axis=0) for k in families])
    within = sum(
        (centred[labels == k] - means[i]).T @ (centred[labels == k] - means[i]) for i, k in enumerate(families)
    ) / len(centred)
    within += 1e-3 * np.trace(within) / len(within) * np.eye(len(within))
    between = means.T @ means / len(families)
    values, vectors = np.linalg.eig(np.linalg.solve(within, between))
    order = np.argsort(-values.real)[: len(families) - 1]
    discriminant = vectors[:, order].real.T
    discriminant /= np.sqrt(np.einsum("ij,jk,ik->i", discriminant, within, discriminant))[:, None]
    _, _, principal = np.linalg.svd(centred, full_matrices=False)
    principal = principal[: PROJECTION_DIM - len(discriminant)]
    principal = 0.1 * principal / np.std(centred @ principal.T, axis=0)[:, None]
    weight = np.concatenate([discriminant, principal])
    direction = mean / np.linalg.norm(mean)
    weight -= (weight @ direction)[:, None] * direction[None, :]
    with torch.no_grad():
        checker.visual_projection.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
    return checker


def save_concept_checker(path: Path, checker) -> Path:
    return save_checker(path, checker)


def write_tokenizer(folder: Path) -> None:
    """A hand-written CLIP BPE vocabulary: the two special tokens, letters, letters ending a word, some merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
    for letter in string.ascii_lowercase:
        vocab[letter + "</w>"] = len(vocab)
    merges = ["s t", "st r", "i p", "e s</w>", "c h", "e c", "k e", "r b", "o a", "r d</w>", "n o", "i s", "c a"]
    for merge in merges:
        token = merge.replace(" ", "")
        if token not in vocab:
            vocab[token] = len(vocab)
    assert len(vocab) <= 99, len(vocab)  # the tiny config's text vocab_size
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def phrase_targets(checker) -> Dict[str, np.ndarray]:
    """The image embedding direction each known phrase should land on."""
    rng = np.random.default_rng(9)
    images = {
        "stripes": [stripes(p, ph) for p, ph in ((17, 2), (20, 6), (23, 1))],
        "checkerboard": [checkerboard(c, o) for c, o in ((10, 1), (20, 2), (28, 3))],
        "a cat": [photo("chelsea")],
        "noise": [noise(rng) for _ in range(3)],
    }
    return {phrase: unit(unit(embed(checker, pictures)).mean(axis=0)) for phrase, pictures in images.items()}


def build_tiny_clip(checker, folder: Path) -> Tuple[Path, Dict[str, np.ndarray]]:
    """Save a CLIPModel + tokenizer sharing `checker`'s vision tower; returns (folder, phrase -> target)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(5)
    clip = CLIPModel(clip_config("tiny", PROJECTION_DIM)).eval()
    clip.vision_model.load_state_dict(checker.vision_model.state_dict())
    targets = phrase_targets(checker)
    with torch.no_grad():
        clip.visual_projection.weight.copy_(checker.visual_projection.weight)
        tokens = tokenizer(list(PHRASES), padding=True, return_tensors="pt")
        hidden = clip.text_model(**tokens).pooler_output.double().numpy()  # [P, 32]
        wanted = np.stack([targets[p] for p in PHRASES])  # [P, 16]
        projection = np.linalg.lstsq(hidden, wanted, rcond=None)[0].T  # [16, 32]: hidden @ W.T = wanted
        clip.text_projection.weight.copy_(torch.from_numpy(projection.astype(np.float32)))
    clip.save_pretrained(str(folder))
    return folder, targets
