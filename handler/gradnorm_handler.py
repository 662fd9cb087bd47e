"""TorchServe entry point: predictions plus a gradient-norm OOD score for every request.

A thin adapter: configuration, decoding, scoring and the answer shape live in the
``torchserve_gradnorm`` package (shipped inside the .mar); this class only connects them
to TorchServe's handler life cycle. TorchServe wants exactly one class in this module.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from ts.torch_handler.base_handler import BaseHandler

from torchserve_gradnorm.calibration import file_sha256, shipped_calibration
from torchserve_gradnorm.config import ConfigError, handler_section, parse_handler_config
from torchserve_gradnorm.metrics import record_batch
from torchserve_gradnorm.response import error_answer
from torchserve_gradnorm.service import GradNormService

logger = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "X-GradNorm-Batch-Size"
LOAD_FAILED_STATUS = HTTPStatus.SERVICE_UNAVAILABLE


class GradNormHandler(BaseHandler):
    load_error: str | None = None

    def initialize(self, context):
        # A load that raises makes TorchServe restart the worker again and again while the
        # model's requests wait, unanswered: keep the worker up and refuse them instead.
        try:
            self._load(context)
        except ConfigError as e:
            self.load_error = f"invalid model-config.yaml: {e}"
            logger.error("gradnorm: model not loaded, %s", self.load_error)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            logger.error("gradnorm: model not loaded, %s", self.load_error, exc_info=True)
        self.initialized = True

    def _load(self, context):
        config = parse_handler_config(handler_section(getattr(context, "model_yaml_config", None)))
        super().initialize(context)
        calibration = shipped_calibration(context.system_properties["model_dir"], config)
        weights_sha256 = file_sha256(self.model_pt_path) if calibration else None
        self.service = GradNormService(
            self.model, config, self.mapping, calibration, weights_sha256, context.model_name
        )
        self.service.warm_up()
        logger.info(
            "gradnorm: scoring %d parameter tensors with %s/%s on %s",
            len(self.service.scorer.selected),
            config.method,
            self.service.scorer.backend,
            self.device,
        )

    def handle(self, data, context):
        if self.load_error is None:
            return super().handle(data, context)
        message = f"model {context.model_name!r} failed to load: {self.load_error}"
        status = LOAD_FAILED_STATUS
        for idx in range(len(data)):
            context.set_response_status(status.value, status.phrase, idx)
            context.set_response_content_type(idx, "application/json")
        return [error_answer(status.value, message) for _ in data]

    def preprocess(self, data):
        return data  # decoded per request by the service, so that one bad body fails alone

    def inference(self, data, *args, **kwargs):
        # BaseHandler.inference runs under torch.inference_mode(), which forbids gradients
        return self.service.handle(data)

    def postprocess(self, replies):
        batch_size = str(self.service.last.samples)
        for idx, reply in enumerate(replies):
            if reply.status != 200:
                self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx)
            self.context.set_response_header(idx, BATCH_SIZE_HEADER, batch_size)
            self.context.set_response_content_type(idx, "application/json")
        record_batch(
            self.context.metrics,
            self.context.model_name,
            replies,
            self.service.last.scoring_ms,
            self.service.score_reference,
        )
        return [reply.body for reply in replies]
