"""TorchServe entry point: predictions plus a gradient-norm OOD score for every request.

A thin adapter: configuration, decoding, scoring and the answer shape live in the
``torchserve_gradnorm`` package (shipped inside the .mar); this class only connects them
to TorchServe's handler life cycle. TorchServe wants exactly one class in this module.
"""

from __future__ import annotations

import logging
import os
from http import HTTPStatus

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import load_label_mapping

from torchserve_gradnorm.calibration import file_sha256, shipped_calibration
from torchserve_gradnorm.config import ConfigError, handler_section, parse_handler_config
from torchserve_gradnorm.hf import text_encoder_for
from torchserve_gradnorm.metrics import record_batch
from torchserve_gradnorm.service import GradNormService, refusals

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
        model_dir = context.system_properties["model_dir"]
        if config.hf_task is None:
            super().initialize(context)
        else:
            self._initialize_hf(context, config)
        text = text_encoder_for(model_dir, self.model, config)
        calibration = shipped_calibration(model_dir, config)
        weights_sha256 = file_sha256(self.model_pt_path) if calibration else None
        version = str(((context.manifest or {}).get("model") or {}).get("modelVersion", ""))
        self.service = GradNormService(
            self.model,
            config,
            self.mapping,
            calibration,
            weights_sha256,
            context.model_name,
            version,
            text=text,
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
        self.context = context
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        message = f"model {context.model_name!r} failed to load: {self.load_error}"
        version = str(((context.manifest or {}).get("model") or {}).get("modelVersion", ""))
        replies = refusals(
            data, headers, LOAD_FAILED_STATUS.value, message, context.model_name, version
        )
        return self._send(replies)

    def _initialize_hf(self, context, config):
        """BaseHandler.initialize for a save_pretrained folder (transformers' Auto classes)."""
        from torchserve_gradnorm import hf

        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{gpu_id}")
        else:
            self.device = torch.device("cpu")
        self.manifest = context.manifest
        model_dir = properties["model_dir"]
        self.model_pt_path = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        self.model = hf.load_model(model_dir, config.hf_task).to(self.device)
        # gradnorm-archive writes config.id2label there unless --labels was given
        self.mapping = load_label_mapping(os.path.join(model_dir, "index_to_name.json"))
        self.initialized = True

    def preprocess(self, data):
        return data  # decoded per request by the service, so that one bad body fails alone

    def inference(self, data, *args, **kwargs):
        # BaseHandler.inference runs under torch.inference_mode(), which forbids gradients
        headers = [self.context.get_all_request_header(i) for i in range(len(data))]
        return self.service.handle(data, headers)

    def postprocess(self, replies):
        body = self._send(replies)
        record_batch(
            self.context.metrics,
            self.context.model_name,
            replies,
            self.service.last.scoring_ms,
            self.service.score_reference,
        )
        return body

    def _send(self, replies):
        """Each reply's status, headers and content type on the context; the bodies."""
        batch_size = str(self.service.last.samples) if self.load_error is None else "0"
        for idx, reply in enumerate(replies):
            if reply.status != 200:
                self.context.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx)
            self.context.set_response_header(idx, BATCH_SIZE_HEADER, batch_size)
            for name, value in reply.headers.items():
                self.context.set_response_header(idx, name, value)
            self.context.set_response_content_type(idx, reply.content_type)
        return [reply.body for reply in replies]
