"""Tokenizers built in code, so that tiny and embedded models need no download.

Qwen2 (Qwen-Image's text encoder), CLIP and T5 (Flux's two text encoders) tokenizers, trained on a few texts.

The Qwen-Image pipelines drop a fixed number of leading tokens (the system prompt of their template:
34 for text-to-image, 64 for Edit / Edit-Plus), so the tokenizer must split the templates exactly as the
real Qwen2 tokenizer does: every template word is one token. A byte-level BPE with Qwen2's split regex,
trained on the templates, does that; words it never saw still tokenize, as byte pieces.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split pattern.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2 / Qwen2.5-VL special tokens, in the order of their real ids (151643 upwards).
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_FIRST_SPECIAL_ID = 151643

QWEN_IMAGE_TEMPLATE_TEXTS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:\nuser\n\nassistant\n",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate.\n"
    "user\n\nassistant\n",
    "Picture 1: Picture 2: Picture 3: ",
)


def special_token_ids(first_id: int = QWEN2_FIRST_SPECIAL_ID) -> dict[str, int]:
    return {token: first_id + offset for offset, token in enumerate(QWEN2_SPECIAL_TOKENS)}


def build_qwen2_tokenizer(extra_texts: Iterable[str] = (), *, compact: bool = False):
    """A transformers `Qwen2Tokenizer` trained offline on the Qwen-Image templates plus `extra_texts`.

    By default the special tokens sit at their real ids (151643...), so text-encoder configs sized for the real
    vocabulary work unchanged; `compact=True` puts them right after the learned vocabulary, for small models.
    """
    from transformers import Qwen2Tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [*QWEN_IMAGE_TEMPLATE_TEXTS, *extra_texts, string.ascii_letters + string.digits]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab = dict(trained["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    specials = special_token_ids(len(vocab) if compact else QWEN2_FIRST_SPECIAL_ID)
    vocab.update(specials)
    qwen_tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        extra_special_tokens=[t for t in QWEN2_SPECIAL_TOKENS if t != "<|endoftext|>"],
    )
    qwen_tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
    for token, token_id in specials.items():
        if qwen_tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"special token {token} did not land on id {token_id}")
    return qwen_tokenizer


def _train_bpe(texts: Iterable[str], tokenizer: Tokenizer, vocab_size: int, **trainer_options) -> tuple[dict, list]:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        **trainer_options,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return dict(trained["vocab"]), merges


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A transformers CLIPTokenizer whose ids stay below `vocab_size`.

    As in the real CLIP vocabulary, <|startoftext|> and <|endoftext|> take the two last ids, so that a text model
    that pools at the largest input id (legacy CLIP configs) pools at the end-of-text token.
    """
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer()._tokenizer  # CLIP's own normalizer and pre-tokenizer
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = reference.normalizer
    tokenizer.pre_tokenizer = reference.pre_tokenizer
    printable = " ".join(c for c in string.printable if not c.isspace())  # every character, also as a word
    vocab, merges = _train_bpe([*texts, printable], tokenizer, vocab_size - 2, end_of_word_suffix="</w>")
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A transformers T5Tokenizer (unigram): whole words of `texts`, then single characters as fallback."""
    from transformers import T5Tokenizer

    words = sorted({word.lower() for text in texts for word in text.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + w, -2.0) for w in words), ("\u2581", -3.0)]
    pieces += [(c, -5.0) for c in sorted(set(string.printable) - set(string.whitespace))]
    extra_ids = 10
    if len(pieces) + extra_ids > vocab_size:
        raise ValueError(f"{len(pieces) + extra_ids} pieces do not fit a vocabulary of {vocab_size}")
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=512)
