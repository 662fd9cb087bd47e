"""A forward-only TorchServe handler: the baseline that bench/load.py compares against.

It serves the same model as the gradnorm handler, with the same ``handler:`` section of
model-config.yaml and the same request decoding (``torchserve_gradnorm.codecs``, limits
included, one bad body failing alone), and answers top-k ``predictions`` only: one forward
pass under ``torch.inference_mode()``, no gradient, no OOD block. The scoring keys of the
section (method, param_filter, ...) are validated and ignored.

Pack it with torch-model-archiver, shipping the ``torchserve_gradnorm`` package beside it
(bench/load.py shows how). TorchServe wants exactly one class in this module.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import torch
from ts.torch_handler.base_handler import BaseHandler

from torchserve_gradnorm.codecs import RequestDecoder, RequestError, request_payload
from torchserve_gradnorm.config import ConfigError, handler_section, parse_handler_config
from torchserve_gradnorm.response import error_answer, label_for

logger = logging.getLogger(__name__)


class PlainHandler(BaseHandler):
    def initialize(self, context):
        try:
            self.config = parse_handler_config(
                handler_section(getattr(context, "model_yaml_config", None))
            )
        except ConfigError as e:
            logger.error("plain: model not loaded, invalid model-config.yaml: %s", e)
            raise
        super().initialize(context)
        self.model.eval()
        self.decoder = RequestDecoder(self.config.input, self.config.limits)
        # per batch: request index -> RequestError, or (first row, rows, many)
        self._plan: list[RequestError | tuple[int, int, bool]] = []

    def preprocess(self, data):
        self._plan = []
        samples = []
        rows = 0
        for request in data:
            try:
                decoded = self.decoder.decode(request_payload(request))
            except RequestError as e:
                self._plan.append(e)
                continue
            n = len(decoded.samples)
            self._plan.append((rows, n, decoded.many))
            samples.append(decoded.samples)
            rows += n
        return torch.cat(samples) if samples else None

    def inference(self, data, *args, **kwargs):
        if data is None:  # every request of the batch was refused
            return None
        return super().inference(data, *args, **kwargs)  # under torch.inference_mode()

    def postprocess(self, data):
        answers = []
        if data is not None:
            probs = torch.softmax(data.float(), dim=1).cpu()
            top_p, top_i = probs.topk(min(self.config.top_k, probs.shape[1]), dim=1)
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist()):
                answers.append(
                    {
                        "predictions": [
                            {"index": i, "label": label_for(self.mapping, i), "probability": p}
                            for p, i in zip(p_row, i_row)
                        ]
                    }
                )
        replies = []
        for idx, step in enumerate(self._plan):
            if isinstance(step, RequestError):
                phrase = HTTPStatus(step.status).phrase
                self.context.set_response_status(step.status, phrase, idx)
                replies.append(error_answer(step.status, step.message))
                continue
            first, n, many = step
            mine = answers[first : first + n]
            replies.append(mine if many else mine[0])
        return replies
