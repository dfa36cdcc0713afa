#!/usr/bin/env bash
# Start the head node of a Ray cluster for rlhf_dist, with token authentication on.
#
#   export RAY_AUTH_TOKEN_PATH=/etc/ray/auth_token          # or: export RAY_AUTH_TOKEN=...
#   cluster/start_head.sh --node-ip 10.0.0.1 --num-gpus 8
#   cluster/start_head.sh --node-ip 10.0.0.1 -- --block     # in a container: stay in the foreground
#
# Options (the environment variable in brackets works too):
#   --node-ip IP          this node's address, reachable from the workers [NODE_IP; default: first of hostname -I]
#   --num-cpus N          logical CPUs [NUM_CPUS; default: Ray counts them]
#   --num-gpus N          GPUs [NUM_GPUS; default: Ray counts them]
#   --port P              GCS port, the one workers join [RAY_PORT; 6379]
#   --dashboard-port P    dashboard and job server, for `rlhf-dist submit` [DASHBOARD_PORT; 8265]
#   --dashboard-host H    where the job server listens [DASHBOARD_HOST; the node IP; 0.0.0.0 = every interface]
#   -- ARGS...            passed to `ray start` unchanged (--temp-dir, --resources, --object-store-memory, --block)
#
# The token: RAY_AUTH_TOKEN, or a file named by RAY_AUTH_TOKEN_PATH (the file stays where it is; Ray reads it).
# Make one once with `umask 077; openssl rand -hex 32 > ~/.ray/cluster_token`, give the same one to every node
# and every client, and never commit it. Refuses to start when Ray already runs on this node.
set -euo pipefail

die() { echo "start_head.sh: error: $*" >&2; exit 2; }

NODE_IP=${NODE_IP:-} NUM_CPUS=${NUM_CPUS:-} NUM_GPUS=${NUM_GPUS:-}
RAY_PORT=${RAY_PORT:-6379} DASHBOARD_PORT=${DASHBOARD_PORT:-8265} DASHBOARD_HOST=${DASHBOARD_HOST:-}
EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --node-ip) NODE_IP=${2:?--node-ip needs a value}; shift 2 ;;
    --num-cpus) NUM_CPUS=${2:?--num-cpus needs a value}; shift 2 ;;
    --num-gpus) NUM_GPUS=${2:?--num-gpus needs a value}; shift 2 ;;
    --port) RAY_PORT=${2:?--port needs a value}; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT=${2:?--dashboard-port needs a value}; shift 2 ;;
    --dashboard-host) DASHBOARD_HOST=${2:?--dashboard-host needs a value}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help; pass ray start options after --)" ;;
  esac
done

# --- the token: from the environment or a file path, never from the repository
if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
  if [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    echo "start_head.sh: both RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are set; Ray uses RAY_AUTH_TOKEN" >&2
  fi
  export RAY_AUTH_TOKEN
elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
  [[ -r $RAY_AUTH_TOKEN_PATH && -s $RAY_AUTH_TOKEN_PATH ]] \
    || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty file"
  RAY_AUTH_TOKEN_PATH=$(realpath "$RAY_AUTH_TOKEN_PATH")   # Ray's processes run in other directories
  [[ $(stat -c %a "$RAY_AUTH_TOKEN_PATH") =~ [0-7](00)$ ]] \
    || echo "start_head.sh: warning: $RAY_AUTH_TOKEN_PATH is readable by others; chmod 600 it" >&2
  export RAY_AUTH_TOKEN_PATH
else
  die "no auth token: export RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file holding it>
  (make one: umask 077; openssl rand -hex 32 > ~/.ray/cluster_token; export RAY_AUTH_TOKEN_PATH=~/.ray/cluster_token)"
fi
export RAY_AUTH_MODE=token

# --- refuse when Ray already runs on this node (this network namespace: a container or a test namespace is a node)
here=$(readlink /proc/self/ns/net)
for pid in $(pgrep -x 'raylet|gcs_server' || true); do
  if [[ $(readlink "/proc/$pid/ns/net" 2>/dev/null) == "$here" ]]; then
    die "Ray already runs on this node ($(cat /proc/$pid/comm 2>/dev/null) pid $pid); stop it first with \`ray stop\`"
  fi
done

command -v ray >/dev/null || die "\`ray\` not found on PATH; activate the environment that has rlhf_dist installed"
[[ -n $NODE_IP ]] || NODE_IP=$(hostname -I 2>/dev/null | awk '{print $1}')
[[ -n $NODE_IP ]] || die "cannot tell this node's IP; pass --node-ip"
DASHBOARD_HOST=${DASHBOARD_HOST:-$NODE_IP}

args=(--head --node-ip-address "$NODE_IP" --port "$RAY_PORT"
      --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats)
[[ -n $NUM_CPUS ]] && args+=(--num-cpus "$NUM_CPUS")
[[ -n $NUM_GPUS ]] && args+=(--num-gpus "$NUM_GPUS")

echo "start_head.sh: ray start ${args[*]} ${EXTRA[*]:-}"
ray start "${args[@]}" "${EXTRA[@]}"
cat <<MSG
start_head.sh: head is up (token auth on).
  join workers:  cluster/join_worker.sh $NODE_IP:$RAY_PORT --node-ip <worker ip>   (same token in their environment)
  submit jobs:   RAY_AUTH_MODE=token rlhf-dist submit CONFIG --address http://$NODE_IP:$DASHBOARD_PORT
MSG
