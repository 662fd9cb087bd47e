"""Text requests -> token ids with the archive's tokenizer -> one padded batch.

Per request (``input.kind: text``), one of:
- a UTF-8 body (``Content-Type: text/plain``, or any body that is not a JSON object);
- JSON ``{"text": "..."}``, ``{"text": "...", "text_pair": "..."}`` (a sentence pair),
  ``{"data": "..."}``, or ``{"instances": [t, ...]}`` where t is a string or one of those
  objects; the Hugging Face Inference API's ``{"inputs": "..."}`` and
  ``{"inputs": ["...", ...]}`` (a list answer) too;
- form fields ``text`` (and ``text_pair``), or one field of any name;
- Open Inference Protocol ``BYTES`` elements, one text each (shape ``[n]``), or ``[n, 2]``
  for sentence pairs (see ``v2.py``).

Each text is tokenized alone when its request is decoded, so one that cannot be (invalid
UTF-8, empty, over ``limits.max_chars``, too many tokens with ``truncation: false``) gets its
own 4xx. The texts of a server-side batch are then padded together, on the right, to the
longest of them: with the attention mask, a sample's logits and score do not depend on the
others or on the padding.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .codecs import Decoded, RequestError, checked_instances
from .config import ConfigError, InputConfig, LimitsConfig

if TYPE_CHECKING:
    from .codecs import RequestDecoder

Tokens = dict[str, list[int]]

_JSON_FORMS = (
    'JSON body must be {"text": ...}, {"text": ..., "text_pair": ...}, {"instances": [...]} '
    'or v2 {"inputs": [...]}'
)


@dataclass(frozen=True)
class Text:
    text: str
    pair: str | None = None


def model_input_names(model: nn.Module) -> frozenset[str] | None:
    """The keyword arguments ``model.forward`` takes; None if it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def text_form_payload(request: Mapping[str, Any]) -> Any:
    """Form fields ``text`` and ``text_pair`` as one JSON-like object; else None."""
    if "text" not in request or request.get("data") is not None or request.get("body"):
        return None
    fields = {k: v for k, v in request.items() if v is not None}
    unknown = sorted(set(fields) - {"text", "text_pair"})
    if unknown:
        raise RequestError(400, f"unexpected form field {unknown[0]!r}: send text and text_pair")
    return {k: _utf8(v, f"form field {k!r}") for k, v in fields.items()}


def _utf8(value: Any, what: str = "body") -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(
                400, f"{what} is not valid UTF-8 text (byte {e.start}: {e.reason})"
            ) from None
    return value


class TextEncoder:
    """Requests -> ``Text`` -> token ids (one request at a time) -> padded batches."""

    def __init__(
        self,
        tokenizer: Any,
        input_config: InputConfig,
        limits: LimitsConfig,
        model_inputs: frozenset[str] | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # right padding: absolute positions of a sample's tokens do not move with the batch
        tokenizer.padding_side = "right"
        if tokenizer.pad_token_id is None:
            raise ConfigError(
                "handler.input.kind",
                "text batches are padded, and the tokenizer has no padding token: set its "
                "pad_token (and the model's pad_token_id, e.g. for GPT-2) before save_pretrained",
            )
        self.input = input_config
        self.limits = limits
        self.model_inputs = model_inputs
        self.max_length = input_config.max_length or model_max_length
        self.model_max_length = model_max_length

    # --- requests -> texts ---

    def decode(self, payload: Any, decoder: RequestDecoder) -> Decoded:
        payload = _utf8(payload)
        if isinstance(payload, str):
            stripped = payload.strip()
            if stripped.startswith("{") and stripped.endswith("}"):
                try:
                    payload = json.loads(stripped)
                except (ValueError, RecursionError) as e:
                    raise RequestError(400, f"invalid JSON: {e}") from None
            else:
                return Decoded([self.tokenize(self.check(Text(payload)))], many=False)
        if not isinstance(payload, Mapping):
            raise RequestError(400, _JSON_FORMS)
        inputs = payload.get("inputs")
        if isinstance(inputs, str):  # Hugging Face Inference API: {"inputs": "text"}
            return Decoded([self.tokenize(self.check(Text(inputs)))], many=False)
        if isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs):
            payload = {"instances": inputs}  # {"inputs": ["text", ...]}
        elif "inputs" in payload:
            return decoder._json(payload)  # a v2 request: the v2 decoder knows it
        if "instances" in payload:
            instances = checked_instances(payload["instances"], self.limits)
            texts = [self.instance(x) for x in instances]
            return Decoded([self.tokenize(t) for t in texts], many=True)
        if "text" in payload or "data" in payload:
            return Decoded([self.tokenize(self.instance(payload))], many=False)
        raise RequestError(400, _JSON_FORMS)

    def instance(self, value: Any) -> Text:
        if isinstance(value, str):
            return self.check(Text(value))
        if isinstance(value, Mapping):
            text = value.get("text", value.get("data"))
            pair = value.get("text_pair")
            for name, item in (("text", text), ("text_pair", pair)):
                if item is not None and not isinstance(item, str):
                    raise RequestError(400, f"'{name}' must be a string, got {type(item).__name__}")
            if text is None:
                raise RequestError(400, "missing 'text'")
            return self.check(Text(text, pair))
        raise RequestError(
            400, f'expected a string or {{"text": ...}} per instance, got {type(value).__name__}'
        )

    def check(self, text: Text) -> Text:
        for part in (text.text, text.pair):
            if part is not None and not part.strip():
                raise RequestError(400, "empty text")
        chars = len(text.text) + len(text.pair or "")
        if chars > self.limits.max_chars:
            raise RequestError(
                413, f"text of {chars} characters exceeds the limit of {self.limits.max_chars}"
            )
        if text.pair is None and self.input.pairs == "required":
            raise RequestError(400, "this model takes sentence pairs: send text and text_pair")
        if text.pair is not None and self.input.pairs == "never":
            raise RequestError(400, "this model takes single texts, not text_pair")
        return text

    # --- texts -> token ids -> batches ---

    def tokenize(self, text: Text) -> Tokens:
        truncation = self.input.truncation or False
        tokens = self.tokenizer(
            text.text,
            text.pair,
            truncation=truncation if self.max_length else False,
            max_length=self.max_length,
        )
        length = len(tokens["input_ids"])
        if self.max_length and length > self.max_length:
            raise RequestError(
                413,
                f"text of {length} tokens exceeds the model's {self.max_length} "
                "(truncation is off)",
            )
        return {k: list(v) for k, v in tokens.items()}

    def pad(self, samples: Sequence[Tokens]) -> dict[str, torch.Tensor]:
        """One batch, padded on the right past its longest sample, with the attention mask.

        One position more than the longest sample gives every sample a masked position:
        transformers skips the mask for a sample with none (``mask.all()``), a branch that
        would then differ between the samples of the batch and keep the fast backend from
        scoring them together. Scores do not depend on padding, so the extra position changes
        no answer. Only the model's own limit caps it, not ``max_length``: a text truncated
        to ``max_length`` is common traffic, and still gets its masked position.
        """
        samples = list(samples)
        longest = max(len(s["input_ids"]) for s in samples)
        length = longest + 1
        if self.model_max_length:
            length = min(length, self.model_max_length)
        batch = self.tokenizer.pad(
            samples, padding="max_length", max_length=length, return_tensors="pt"
        )
        return {
            name: tensor
            for name, tensor in batch.items()
            if self.model_inputs is None or name in self.model_inputs
        }

    def examples(self) -> list[Tokens]:
        """Two texts of different lengths: a warm-up batch with padding, so that what the
        fast backend cannot do with it (inputs broadcast over the batch) shows at load."""
        return [self.tokenize(Text("hello")), self.tokenize(Text("hello, hello world"))]

    def texts_from_elements(self, items: list[Any], pairs: bool) -> list[Tokens]:
        """v2 BYTES elements (strings) -> token ids; ``pairs``: consecutive (text, pair)."""
        strings = [_utf8(item, "a BYTES element") for item in items]
        if not all(isinstance(s, str) for s in strings):
            raise RequestError(400, "BYTES elements must be strings")
        if pairs:
            texts = [Text(a, b) for a, b in zip(strings[::2], strings[1::2])]
        else:
            texts = [Text(s) for s in strings]
        return [self.tokenize(self.check(t)) for t in texts]
