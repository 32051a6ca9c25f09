#!/usr/bin/env bash
# Every party in turn, on this machine and loopback: batch (predict) and online (serve, query).
# Simulated attestation: there is no SGX here (with SGX: build with --sgx instead of
# --attest simulated, run with --backend sgx, and write policies without --allow-simulated).
set -euo pipefail

# Sizes (tests/test_walkthrough.py makes them tiny)
NET=${NET:-lenet5}               # the model
EPOCHS=${EPOCHS:-2}              # training epochs
MAX_BATCHES=${MAX_BATCHES:-200}  # training batches per epoch
IMAGES=${IMAGES:-8}              # test images the data owner sends
# One port each
MO_PORT=${MO_PORT:-8441}         # the model owner's key broker
DO_PORT=${DO_PORT:-8442}         # the data owner's key broker
SERVE_PORT=${SERVE_PORT:-8443}   # the online service
WORK=${WORK:-walkthrough}        # a new directory for all the files
BT=${BT:-branchy-tee}
ENCLAVE_ENV=${ENCLAVE_ENV:-$PWD/.enclave-env}  # the enclave's Python environment (`make` made it)

mkdir "$WORK"
cd "$WORK"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
wait_for() {  # PORT PID: until the process listens there (it must stay alive; at most 120 s)
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "the process for port $1 stopped" >&2; return 1; }
        sleep 0.2
    done
    echo "nothing listens on port $1 after 120 s" >&2
    return 1
}

# 1. Model owner: train and seal the model; an identity for its key broker and its signatures.
$BT train --net "$NET" --epochs "$EPOCHS" --max-batches "$MAX_BATCHES" --out run
$BT keygen --out mo.key
$BT keygen --identity --out mo.id
MO=$($BT keygen --show mo.id | cut -d' ' -f2)      # (sent to everyone, out of band)
$BT seal run --key mo.key --out model.btee

# 2. Data owner: a key for its requests, an identity (sent to the model owner), test images.
$BT keygen --out do.key
$BT keygen --identity --out do.id
DO=$($BT keygen --show do.id | cut -d' ' -f2)
$BT images --count "$IMAGES" --out images

# 3. Host: build the batch enclave for the bundle; the model owner's broker and identity are measured.
mkdir io
$BT enclave build --bundle model.btee --out enclave --env "$ENCLAVE_ENV" --attest simulated \
    --io-dir io --model-broker "http://127.0.0.1:$MO_PORT" --model-broker-identity "$MO"

# 4. Model owner: reproduce the build (here: the same one), sign a release statement, write its
#    broker's policy from it (allowing the data owner) and start the broker.
$BT enclave release enclave --identity mo.id --model-key mo.key --out release.json
$BT enclave policy --release release.json --model-owner "$MO" --allow-simulated \
    --allowed-data-owner "$DO" --out mo-policy.toml
$BT key-broker --keys mo.key --policy mo-policy.toml --identity mo.id --listen "127.0.0.1:$MO_PORT" &
pids+=($!)

# 5. Data owner: verify the statement, write its policy from it, start its broker, encrypt a request.
$BT enclave policy --release release.json --model-owner "$MO" --allow-simulated --out do-policy.toml
$BT key-broker --keys do.key --policy do-policy.toml --identity do.id --listen "127.0.0.1:$DO_PORT" &
pids+=($!)
$BT encrypt-input images/*.png --bundle model.btee --key do.key --out io/request.enc
wait_for "$MO_PORT" "${pids[0]}"
wait_for "$DO_PORT" "${pids[1]}"

# 6. Host: run the enclave on the request; it gets both keys from the brokers by attestation.
$BT enclave run enclave --backend native -- predict --bundle model.btee \
    --input io/request.enc --output io/result.enc --data-broker "http://127.0.0.1:$DO_PORT"

# 7. Data owner: only its key opens the result, and only as the answer to its request.
$BT decrypt-result io/result.enc --key do.key --request io/request.enc

# 8. Online. Host: build the serving enclave. Model owner: release it, and serve its key to it.
$BT enclave build --bundle model.btee --out enclave-serve --env "$ENCLAVE_ENV" --attest simulated \
    --serve --io-dir io --model-broker "http://127.0.0.1:$MO_PORT" --model-broker-identity "$MO"
$BT enclave release enclave-serve --identity mo.id --model-key mo.key --out release-serve.json
$BT enclave policy --release release-serve.json --model-owner "$MO" --allow-simulated \
    --allowed-data-owner "$DO" --out mo-policy-serve.toml
kill "${pids[0]}" && wait "${pids[0]}" || true
$BT key-broker --keys mo.key --policy mo-policy-serve.toml --identity mo.id --listen "127.0.0.1:$MO_PORT" &
pids+=($!)
wait_for "$MO_PORT" "$!"

# 9. Host: serve. Data owner: its policy for the serving enclave, then query it over attested TLS.
$BT enclave run enclave-serve --backend native -- serve --bundle model.btee --listen "127.0.0.1:$SERVE_PORT" &
pids+=($!)
serve_pid=$!
$BT enclave policy --release release-serve.json --model-owner "$MO" --allow-simulated --out do-policy-serve.toml
wait_for "$SERVE_PORT" "$serve_pid"
$BT query "https://127.0.0.1:$SERVE_PORT" images/*.png --policy do-policy-serve.toml --identity do.id
