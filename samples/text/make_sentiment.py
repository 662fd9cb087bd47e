"""A tiny BERT sentiment classifier trained on generated movie-review sentences (no download).

Writes samples/text/sentiment/ (save_pretrained: config.json, model.safetensors, tokenizer)
and samples/text/id (held-out generated reviews, .txt) and samples/text/ood (.jsonl: text
the model was not trained for), to try ``gradnorm-archive --hf-model`` and
``gradnorm-calibrate`` on text. Deterministic; about a minute on two CPU cores.

    python samples/text/make_sentiment.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
NOUNS = ["movie", "film", "story", "plot", "cast", "ending", "script", "soundtrack"]
GOOD = ["good", "great", "wonderful", "brilliant", "moving", "funny", "beautiful", "superb"]
BAD = ["bad", "awful", "boring", "dull", "terrible", "weak", "clumsy", "tedious"]
LOVE = ["loved", "liked", "enjoyed", "adored"]
HATE = ["hated", "disliked", "regretted", "endured"]
TEMPLATES = [
    "the {noun} was {adj}",
    "a {adj} {noun}",
    "what a {adj} {noun} !",
    "i {verb} the {noun}",
    "i {verb} this {noun} , it was {adj}",
    "the {noun} is really {adj}",
    "honestly , the {noun} felt {adj}",
]
LABELS = {0: "negative", 1: "positive"}


def review(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    adjectives, verbs = (GOOD, LOVE) if label else (BAD, HATE)
    text = rng.choice(TEMPLATES).format(
        noun=rng.choice(NOUNS), adj=rng.choice(adjectives), verb=rng.choice(verbs)
    )
    return text, label


def vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{", " ").replace("}", " ").split()}
    words |= set(NOUNS + GOOD + BAD + LOVE + HATE) | {"noun", "adj", "verb"}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return specials + sorted(words - {"noun", "adj", "verb"})


def main() -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    vocab = vocabulary()
    tokenizer = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    tokenizer.model_max_length = 32
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=2, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(300):
        batch = [review(rng) for _ in range(32)]
        inputs = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([y for _, y in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = [review(random.Random(1000 + i)) for i in range(200)]
    with torch.no_grad():
        inputs = tokenizer([t for t, _ in held_out], padding=True, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(1)
    accuracy = (predicted == torch.tensor([y for _, y in held_out])).float().mean().item()
    print(f"held-out accuracy on 200 generated reviews: {accuracy:.3f}")
    model.save_pretrained(HERE / "sentiment")
    tokenizer.save_pretrained(HERE / "sentiment")

    (HERE / "id").mkdir(exist_ok=True)
    for i, (text, _) in enumerate(held_out[:40]):
        (HERE / "id" / f"review_{i:02d}.txt").write_text(text + "\n")
    (HERE / "ood").mkdir(exist_ok=True)
    other = [
        "the central bank raised interest rates by half a point",
        "preheat the oven and whisk two eggs with sugar",
        "error 404 : page not found",
        "la pelicula fue muy buena",
        "qwzx plmk vvbn trew",
        "the the the the the the",
        "please reset my password",
        "rain is expected in the north tomorrow",
    ]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in other)
    (HERE / "ood" / "other_text.jsonl").write_text(lines)


if __name__ == "__main__":
    main()
