#!/bin/sh
# Start TorchServe with the demo archive, check that it really answers a prediction, then
# keep it in the foreground until Ctrl-C. `torchserve --start` returns 0 even when the
# server or the model fails right after, so success here means an answered request.
#
# Run from the folder holding config.properties, metrics.yaml and model_store/ (the repo
# root for `make serve`), with the venv's bin/ on PATH. SERVE_WAIT_S bounds the wait.
set -u
PICTURE="$(dirname "$0")/images/id/digit_3_idx45.png"
WAIT_S=${SERVE_WAIT_S:-180}
LOG=logs/model_log.log
CONSOLE=logs/torchserve_console.log
ADDRESS=$(sed -n 's/^inference_address=//p' config.properties)
METRICS_ADDRESS=$(sed -n 's/^metrics_address=//p' config.properties)
METRICS=$(sed -n 's/^metrics_config=//p' config.properties)

if [ -n "$METRICS" ] && [ ! -f "$METRICS" ]; then
  # TorchServe reads a relative metrics_config from the folder it starts in; without the
  # file its workers fail over and over (MetricsCacheIOError)
  echo "serve: FAILED: config.properties names metrics_config=$METRICS, which is not in $(pwd): copy metrics.yaml beside config.properties" >&2
  exit 1
fi

rm -f key_file.json  # TorchServe writes a new one; an old one would hold stale keys
mkdir -p logs
# the console output (the log files' lines again) goes to a file, so that this script's
# messages stay readable
torchserve --start --foreground --ncs --ts-config config.properties --model-store model_store \
  --models digits=digits.mar >"$CONSOLE" 2>&1 &
server=$!

stop() {
  torchserve --stop >/dev/null 2>&1
  wait "$server" 2>/dev/null
}

fail() {
  echo "serve: FAILED: $1" >&2
  for file in "$LOG" "$CONSOLE"; do
    if [ -s "$file" ]; then
      echo "--- last lines of $file:" >&2
      tail -n 12 "$file" >&2
    fi
  done
  stop
  exit 1
}

trap 'stop; exit 130' INT TERM

deadline=$(( $(date +%s) + WAIT_S ))
answer=
while :; do
  kill -0 "$server" 2>/dev/null || fail "TorchServe exited during start-up"
  [ "$(date +%s)" -lt "$deadline" ] || fail "no prediction answered at $ADDRESS within ${WAIT_S}s${answer:+; last answer:
$answer}"
  if [ -f key_file.json ]; then
    if answer=$(gradnorm-client --url "$ADDRESS" --key-file key_file.json "$PICTURE" 2>&1); then
      break
    fi
    case $answer in
      # the handler kept the worker up to report why the model did not load: final
      *"failed to load"*) fail "the demo model did not load:
$answer" ;;
    esac
  fi
  sleep 1
done

cat <<TXT
TorchServe answered at $ADDRESS:
$answer

Token authorization is on: TorchServe wrote key_file.json here. In another shell, try:

  source .venv/bin/activate
  KEY=\$(python3 -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])')
  curl -s -H "Authorization: Bearer \$KEY" -T samples/images/id/digit_3_idx45.png $ADDRESS/predictions/digits
  curl -s -H "Authorization: Bearer \$KEY" -T samples/images/ood/letter_W.png $ADDRESS/predictions/digits
  curl -s -H "Authorization: Bearer \$KEY" -F data=@samples/images/ood/checkerboard.png $ADDRESS/predictions/digits
  gradnorm-client --url $ADDRESS samples/images/id samples/images/ood
  curl -s $METRICS_ADDRESS/metrics | grep -i ood

Model logs: $LOG, server console: $CONSOLE. Stop with Ctrl-C.
TXT
wait "$server"
