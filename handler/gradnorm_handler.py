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
from torchserve_gradnorm.metrics import record_batch
from torchserve_gradnorm.service import GradNormService

logger = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "X-GradNorm-Batch-Size"


class GradNormHandler(BaseHandler):
    def initialize(self, context):
        try:
            config = parse_handler_config(
                handler_section(getattr(context, "model_yaml_config", None))
            )
            model_dir = context.system_properties["model_dir"]
            if config.hf_task is None:
                super().initialize(context)
            else:
                self._initialize_hf(context, config)
            text = None
            if config.input.kind == "text":
                from torchserve_gradnorm.hf import load_text_encoder

                text = load_text_encoder(model_dir, self.model, config)
            calibration = shipped_calibration(model_dir, config)
            weights_sha256 = file_sha256(self.model_pt_path) if calibration else None
            self.service = GradNormService(
                self.model,
                config,
                self.mapping,
                calibration,
                weights_sha256,
                context.model_name,
                text=text,
            )
            self.service.warm_up()
        except ConfigError as e:
            logger.error("gradnorm: model not loaded, invalid model-config.yaml: %s", e)
            raise
        logger.info(
            "gradnorm: scoring %d parameter tensors with %s/%s on %s",
            len(self.service.scorer.selected),
            config.method,
            self.service.scorer.backend,
            self.device,
        )

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
