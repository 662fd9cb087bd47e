#!/bin/sh
# Start TorchServe with the demo archive in the foreground and print requests to try.
set -e
cat <<'TXT'
Starting TorchServe on 127.0.0.1 (inference :8080, metrics :8082) with model_store/digits.mar.
Token authorization is on: TorchServe writes key_file.json here. In another shell, try:

  KEY=$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  curl -s -H "Authorization: Bearer $KEY" -T samples/images/id/digit_3_idx45.png http://127.0.0.1:8080/predictions/digits
  curl -s -H "Authorization: Bearer $KEY" -T samples/images/ood/letter_W.png http://127.0.0.1:8080/predictions/digits
  curl -s -H "Authorization: Bearer $KEY" -F data=@samples/images/ood/checkerboard.png http://127.0.0.1:8080/predictions/digits
  .venv/bin/gradnorm-client samples/images/id samples/images/ood
  curl -s http://127.0.0.1:8082/metrics | grep -i ood

Model logs: logs/model_log.log. Stop with Ctrl-C.
TXT
exec torchserve --start --foreground --ncs --ts-config config.properties --model-store model_store --models digits=digits.mar
