#!/usr/bin/env bash
# Join this machine to a running Ray cluster for rlhf_dist as a worker node, with token authentication on.
#
#   export RAY_AUTH_TOKEN_PATH=/etc/ray/auth_token          # the head's token; or: export RAY_AUTH_TOKEN=...
#   cluster/join_worker.sh 10.0.0.1:6379 --node-ip 10.0.0.2 --num-gpus 8
#
# HEAD_ADDRESS (first argument, or RAY_HEAD_ADDRESS) is the head's GCS, IP:PORT (port 6379 unless the head changed
# it); the raylet started here finds the cluster through it alone.
# Options (the environment variable in brackets works too):
#   --node-ip IP          this node's address, reachable from the head [NODE_IP; default: first of hostname -I]
#   --num-cpus N          logical CPUs [NUM_CPUS; default: Ray counts them]
#   --num-gpus N          GPUs [NUM_GPUS; default: Ray counts them]
#   -- ARGS...            passed to `ray start` unchanged (--temp-dir, --resources, --object-store-memory, --block)
# Refuses to start when Ray already runs on this node.
set -euo pipefail

die() { echo "join_worker.sh: error: $*" >&2; exit 2; }

HEAD_ADDRESS=${RAY_HEAD_ADDRESS:-} NODE_IP=${NODE_IP:-} NUM_CPUS=${NUM_CPUS:-} NUM_GPUS=${NUM_GPUS:-}
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --node-ip) NODE_IP=${2:?--node-ip needs a value}; shift 2 ;;
    --num-cpus) NUM_CPUS=${2:?--num-cpus needs a value}; shift 2 ;;
    --num-gpus) NUM_GPUS=${2:?--num-gpus needs a value}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option '$1' (see --help; pass ray start options after --)" ;;
    *) HEAD_ADDRESS=$1; shift ;;
  esac
done
[[ -n $HEAD_ADDRESS ]] || die "missing HEAD_ADDRESS (the head's IP:6379), as the first argument or RAY_HEAD_ADDRESS"
[[ $HEAD_ADDRESS == *:* ]] || HEAD_ADDRESS=$HEAD_ADDRESS:6379

# --- the token: from the environment or a file path, never from the repository
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
  export RAY_AUTH_TOKEN
elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
  [[ -r $RAY_AUTH_TOKEN_PATH && -s $RAY_AUTH_TOKEN_PATH ]] \
    || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty file"
  RAY_AUTH_TOKEN_PATH=$(realpath "$RAY_AUTH_TOKEN_PATH")
  export RAY_AUTH_TOKEN_PATH
else
  die "no auth token: export RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file holding it> (the head's token)"
fi
export RAY_AUTH_MODE=token

# --- refuse when Ray already runs on this node (this network namespace)
here=$(readlink /proc/self/ns/net)
for pid in $(pgrep -x 'raylet|gcs_server' || true); do
  if [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "$here" ]]; then
    die "Ray already runs on this node ($(cat /proc/$pid/comm 2>/dev/null) pid $pid); stop it first with \`ray stop\`"
  fi
done

command -v ray >/dev/null || die "\`ray\` not found on PATH; activate the environment that has rlhf_dist installed"
# Fail fast with a plain message instead of ray start's long retry loop when the head is not reachable.
timeout 5 bash -c "exec 3<>/dev/tcp/${HEAD_ADDRESS%:*}/${HEAD_ADDRESS##*:}" 2>/dev/null \
  || die "cannot reach the head's GCS at $HEAD_ADDRESS; is start_head.sh running there, port ${HEAD_ADDRESS##*:} open?"
[[ -n $NODE_IP ]] || NODE_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
[[ -n $NODE_IP ]] || die "cannot tell this node's IP; pass --node-ip"

args=(--address "$HEAD_ADDRESS" --node-ip-address "$NODE_IP" --disable-usage-stats)
[[ -n $NUM_CPUS ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n $NUM_GPUS ]] && args+=(--num-gpus "$NUM_GPUS")

echo "join_worker.sh: ray start ${args[*]} ${EXTRA[*]:-}"
ray start "${args[@]}" "${EXTRA[@]}"
echo "join_worker.sh: joined $HEAD_ADDRESS as $NODE_IP"
