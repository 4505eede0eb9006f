"""``edgevlm synth``: write the embedded synthetic dataset (LLaVA format) and, optionally, its tokenizer."""

from __future__ import annotations

import time


def synth(out: str, train: int = 4000, val: int = 200, test: int = 500, seed: int = 0, image_size: int = 112,
          grid: int = 2, glyphs: bool = False, multi_turn: bool = False, tokenizer_vocab: int | None = None,
          overwrite: bool = False) -> None:
    """Generate the synthetic shapes dataset: images, LLaVA JSON splits and dataset_info.json.

    Each image holds one shape (asked about its shape, colour, grid position or size) or 1-4 identical shapes
    (asked how many); answers follow from the pixels. Output: OUT/images/*.png, OUT/{train,val,test}.json,
    OUT/dataset_info.json, and OUT/tokenizer/ with --tokenizer-vocab. The directory is written atomically.

    Args:
        out: output directory (must not exist or be empty, unless --overwrite).
        train: number of training images.
        val: number of validation images (one question each).
        test: number of test images (one question each).
        seed: random seed; the same seed gives the same dataset bit for bit.
        image_size: image side in pixels (the demo preset uses 112).
        grid: cells per side of the position grid: 2 (quadrants: top left ... bottom right; larger shapes) or 3
            (adds top center, middle left, center ...; smaller shapes, harder).
        glyphs: also draw capital letters and ask "What letter is written?".
        multi_turn: training images ask every question their scene answers, as one multi-turn conversation
            (more supervision per image); val/test keep one question per image.
        tokenizer_vocab: also train a BPE tokenizer of at most this many tokens on the conversations into
            OUT/tokenizer/ (the tiny presets use 384, demo 512).
        overwrite: replace OUT if it holds a dataset `edgevlm synth` wrote (any other non-empty folder is refused).
    """
    from edgevlm.train.synthetic import answer_vocabulary, write_dataset

    t0 = time.perf_counter()
    path = write_dataset(out, train=train, val=val, test=test, seed=seed, image_size=image_size, grid=grid,
                         glyphs=glyphs, multi_turn=multi_turn, tokenizer_vocab=tokenizer_vocab, overwrite=overwrite)
    dt = time.perf_counter() - t0
    splits = ", ".join(f"{name} {n}" for name, n in (("train", train), ("val", val), ("test", test)) if n)
    print(f"wrote {train + val + test} samples ({splits}) of {image_size}px to {path} in {dt:.1f} s")
    vocab = answer_vocabulary(glyphs, grid)
    print("question types: " + ", ".join(f"{k} ({len(v)} answers)" for k, v in vocab.items()))
    if tokenizer_vocab:
        print(f"tokenizer: {path / 'tokenizer'}")


COMMANDS = {"synth": synth}
