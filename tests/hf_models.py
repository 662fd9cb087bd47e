"""Tiny Hugging Face classifiers and tokenizers, built offline from configs and a vocabulary.

Random weights, a handful of dimensions: enough to exercise the real model code (attention
masks, broadcast position ids, pooling) in well under a second. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "is", "good", "bad", "not", "very"]
WORDS += ["movie", "film", "was", "and", "but", "i", "liked", "hated", "it", "."]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXT_MODELS = ("bert", "distilbert", "roberta", "gpt2")
SMALL = {"hidden": 8, "layers": 1, "heads": 2, "ffn": 16, "positions": 64}


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte is one vocabulary symbol."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def bpe_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary: specials, the 256 byte symbols and a few merges."""
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("c", "a"), ("ca", "t"), ("Ġ", "cat")]
    tokens = specials + _byte_alphabet() + ["".join(m) for m in merges]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def tokenizer(kind: str):
    import transformers

    if kind in ("bert", "distilbert"):
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        cls = transformers.BertTokenizer if kind == "bert" else transformers.DistilBertTokenizer
        return cls(vocab={t: i for i, t in enumerate(vocab)})
    if kind == "roberta":
        vocab, merges = bpe_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return transformers.RobertaTokenizer(vocab=vocab, merges=merges)
    if kind == "gpt2":
        vocab, merges = bpe_vocab(["<|endoftext|>", "<pad>"])
        return transformers.GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<pad>")
    raise ValueError(kind)


def text_classifier(kind: str, vocab_size: int, pad_id: int, seed: int = 0) -> torch.nn.Module:
    import transformers as t

    torch.manual_seed(seed)
    s = SMALL
    common = {"num_labels": len(LABELS), "id2label": LABELS, "pad_token_id": pad_id}
    common["label2id"] = {v: k for k, v in LABELS.items()}
    if kind == "bert":
        config = t.BertConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["ffn"],
            max_position_embeddings=s["positions"], **common,
        )  # fmt: skip
        model = t.BertForSequenceClassification(config)
    elif kind == "distilbert":
        config = t.DistilBertConfig(
            vocab_size=vocab_size, dim=s["hidden"], n_layers=s["layers"], n_heads=s["heads"],
            hidden_dim=s["ffn"], max_position_embeddings=s["positions"], **common,
        )  # fmt: skip
        model = t.DistilBertForSequenceClassification(config)
    elif kind == "roberta":
        config = t.RobertaConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["ffn"],
            max_position_embeddings=s["positions"] + 2, **common,
        )  # fmt: skip
        model = t.RobertaForSequenceClassification(config)
    elif kind == "gpt2":
        config = t.GPT2Config(
            vocab_size=vocab_size, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
            n_inner=s["ffn"], n_positions=s["positions"], bos_token_id=0, eos_token_id=0, **common,
        )  # fmt: skip
        model = t.GPT2ForSequenceClassification(config)
    else:
        raise ValueError(kind)
    return model.double().eval()


def text_model_dir(kind: str, folder: Path, seed: int = 0) -> Path:
    """A save_pretrained folder (config, safetensors weights, tokenizer) of a tiny model."""
    tok = tokenizer(kind)
    model = text_classifier(kind, len(tok), tok.pad_token_id, seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def vit_classifier(seed: int = 0) -> torch.nn.Module:
    import transformers as t

    torch.manual_seed(seed)
    config = t.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=len(LABELS), id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    return t.ViTForImageClassification(config).double().eval()


def vit_model_dir(folder: Path, seed: int = 0) -> Path:
    import transformers as t

    vit_classifier(seed).save_pretrained(folder)
    processor = t.ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
    )
    processor.save_pretrained(folder)
    return folder


def autograd_reference(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, float]:
    """Logits and confounding score (minus the squared L2 norm of the gradient of
    -sum log softmax over all parameters) of ONE sample, by plain autograd."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            logits = output.logits
            loss = -torch.log_softmax(logits, dim=-1).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    norm = sum(float(g.double().square().sum()) for g in grads if g is not None)
    return logits.detach()[0], -norm
