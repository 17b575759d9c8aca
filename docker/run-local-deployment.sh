#!/usr/bin/env bash
# Runbook: a real Flower deployment of afl_flwr on this machine (loopback only).
#
# Starts one SuperLink and N SuperNodes (SuperNode i serves partition-id i),
# registers the nodes' public keys, writes the `flwr` CLI connection, runs the
# app with `flwr run --stream`, and stops every process it started on exit
# (also on Ctrl-C or an error). By default the SuperLink serves TLS and accepts
# only registered SuperNodes (`--enable-supernode-auth`); `--insecure` runs
# plain HTTP without node authentication.
#
# Usage (from the repository root, with the venv that has afl-flwr installed):
#   . .venv/bin/activate
#   docker/run-local-deployment.sh --data-dir /path/to/mnist [options]
#
# Options:
#   --insecure               plain HTTP, no SuperNode authentication
#   --nodes N                SuperNodes to start, = run-config num-clients (default 3)
#   --port P                 SuperLink port: Fleet, Control and Runtime APIs (default 9100)
#   --node-base-port P       SuperNode i serves its Runtime API on P+i (default 9200)
#   --work-dir DIR           FLWR_HOMEs, certificates and logs (default: a new temp dir)
#   --certs-dir DIR          TLS material and node keys (default: WORK_DIR/certs,
#                            created with docker/generate-certs.sh)
#   --app DIR                the Flower app to run (default: the repository root)
#   --data-dir DIR           run-config data-dir (MNIST/CIFAR-10 IDX folder)
#   --results-dir DIR        run-config results-dir (default: ./results)
#   --run-config "k=v ..."   further run-config overrides (repeatable, later wins);
#                            num-clients and clients-per-round default to --nodes
#   --task-launcher L        how each SuperNode starts its task processes: `warm`
#                            (default: Flower's SuperExec, task processes forked
#                            from a template that imported flwr-clientapp once,
#                            python -m afl_flwr.warm_exec) or `flower` (Flower's
#                            own: every task process starts cold)
#   --node-pull-interval S   seconds a SuperNode waits after a pull that found no
#                            message (default 0.5: python -m afl_flwr.supernode;
#                            3 runs Flower's flower-supernode, whose fixed wait
#                            that is)
#   --keep-running           after the run, keep the SuperLink and SuperNodes up
#                            (for another `flwr run`, e.g. a resume) until Ctrl-C
#   --check-only             validate the run config, start nothing
#   -h, --help               show this help
#
# The run config is validated (`python -m afl_flwr.launch check`) before any
# process starts: a config that cannot work exits 2 with the error.
#
# Every process is printed as a command that starts it again (e.g. a SuperNode
# that died); with --keep-running, so is the `flwr run` of another run.
#
# Exit status: 0 when the run finished with status `finished:completed`
# (with --keep-running: 130 or 143 once stopped, or 2 if the SuperLink exits).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
insecure=0
nodes=3
port=9100
node_base_port=9200
work_dir=""
certs_dir=""
app="$(dirname "$here")"
data_dir=""
results_dir="results"
extra_config=()
check_only=0
keep_running=0
task_launcher=warm
node_pull_interval=0.5

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }
# The arguments as words to paste into a shell, quoted only where needed.
shell_words() {
  local word safe='^[A-Za-z0-9_./:=@%+,-]+$' out=()
  for word; do
    if [[ "$word" =~ $safe ]]; then out+=("$word")
    elif [[ "$word" != *"'"* ]]; then out+=("'$word'")
    elif [[ "$word" != *[\"\$\`\\!]* ]]; then out+=("\"$word\"")
    else out+=("$(printf %q "$word")")
    fi
  done
  echo "${out[*]}"
}

while (($#)); do
  case "$1" in
    --insecure) insecure=1 ;;
    --nodes) nodes="${2:?}"; shift ;;
    --port) port="${2:?}"; shift ;;
    --node-base-port) node_base_port="${2:?}"; shift ;;
    --work-dir) work_dir="${2:?}"; shift ;;
    --certs-dir) certs_dir="${2:?}"; shift ;;
    --app) app="${2:?}"; shift ;;
    --data-dir) data_dir="${2:?}"; shift ;;
    --results-dir) results_dir="${2:?}"; shift ;;
    --run-config) extra_config+=("${2:?}"); shift ;;
    --task-launcher) task_launcher="${2:?}"; shift ;;
    --node-pull-interval) node_pull_interval="${2:?}"; shift ;;
    --keep-running) keep_running=1 ;;
    --check-only) check_only=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$task_launcher" == warm || "$task_launcher" == flower ]] ||
  die "--task-launcher must be 'warm' or 'flower', got '$task_launcher'"
if ! [[ "$node_pull_interval" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] ||
  ! python -c "import sys; sys.exit(not 0 < float(sys.argv[1]) <= 60)" "$node_pull_interval"; then
  die "--node-pull-interval must be a number of seconds in (0, 60], got '$node_pull_interval'"
fi
for cmd in flwr flower-superlink flower-supernode flower-superexec python; do
  command -v "$cmd" >/dev/null ||
    die "'$cmd' is not on PATH: activate the venv where afl-flwr is installed"
done

# Absolute paths: the ServerApp runs in the SuperLink's working directory and
# the flwr CLI requires an absolute root-certificates path.
app="$(realpath "$app")"
results_dir="$(realpath -m "$results_dir")"

# The run config: one partition per SuperNode and every node kept busy, then the
# caller's overrides (repeated --run-config options are merged, later ones win).
# Refused here, before any process starts, if it cannot work.
run_config="num-clients=$nodes clients-per-round=$nodes results-dir='$results_dir'"
[[ -n "$data_dir" ]] && run_config+=" data-dir='$(realpath -m "$data_dir")'"
run_args=(--run-config "$run_config")
for overrides in "${extra_config[@]}"; do run_args+=(--run-config "$overrides"); done
python -m afl_flwr.launch check "$app" --nodes "$nodes" "${run_args[@]}" ||
  die "run config refused; nothing was started"
((check_only)) && exit 0

work_dir="$(realpath -m "${work_dir:-$(mktemp -d -t afl-flwr-deployment.XXXXXX)}")"
certs_dir="$(realpath -m "${certs_dir:-$work_dir/certs}")"
mkdir -p "$work_dir/logs" "$work_dir/flwr-home/cli"

# Every Flower process gets its own FLWR_HOME (installed apps live there), no
# update check; the SuperLink installs no per-run dependencies (the venv has them).
export FLWR_DISABLE_UPDATE_CHECK=1
# N SuperNodes share this machine's cores: one intra-op thread per ClientApp
# avoids oversubscription (which slows PyTorch down several-fold).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Each SuperNode's SuperExec asks for a new task every this many seconds: Flower's
# default 1 s adds 0.5 s to every task on average, 0.1 s costs each SuperExec
# about 4% of a core in polls (benchmarks/deployment.py); 0.25 s is between.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.25}"
# A task process waits up to 4 s at exit to send Flower's usage telemetry; off,
# it exits as soon as its reply is sent (benchmarks/deployment.py).
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

pids=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if ((${#pids[@]})); then
    echo "Stopping ${#pids[@]} process(es): ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      ((alive)) || break
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
    if command -v pgrep >/dev/null; then
      pgid=$(ps -o pgid= $$ | tr -d ' ')
      # A task process (flwr-clientapp, or forked by afl_flwr.warm_exec) still
      # running for a stopped SuperNode has nobody to reply to (left alone, it
      # retries for some 15 s): stop it.
      pkill -TERM -g "$pgid" -f 'flwr-clientapp|afl_flwr.warm_exec' 2>/dev/null || true
      # Each node's warm trainer (python -m afl_flwr.node_worker, run config
      # node-worker) exits within a second of its SuperNode: wait for it, then
      # stop what is left.
      for _ in $(seq 50); do
        pgrep -g "$pgid" -f 'afl_flwr.node_worker|flwr-clientapp|afl_flwr.warm_exec' >/dev/null || break
        sleep 0.2
      done
      pkill -TERM -g "$pgid" -f 'afl_flwr.node_worker|flwr-clientapp|afl_flwr.warm_exec' 2>/dev/null || true
      for _ in $(seq 25); do
        pgrep -g "$pgid" -f 'afl_flwr.node_worker|flwr-clientapp|afl_flwr.warm_exec' >/dev/null || break
        sleep 0.2
      done
      pkill -KILL -g "$pgid" -f 'afl_flwr.node_worker|flwr-clientapp|afl_flwr.warm_exec' 2>/dev/null || true
    fi
  fi
  echo "Logs: $work_dir/logs"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# $1: log name; rest: command. Runs in the background with its own FLWR_HOME.
start() {
  local name="$1"
  shift
  mkdir -p "$work_dir/flwr-home/$name"
  echo "+ FLWR_HOME=$(shell_words "$work_dir/flwr-home/$name") $(shell_words "$@")" \
    " # log: $work_dir/logs/$name.log"
  FLWR_HOME="$work_dir/flwr-home/$name" "$@" >"$work_dir/logs/$name.log" 2>&1 &
  pids+=("$!")
}

cli() { FLWR_HOME="$work_dir/flwr-home/cli" "$@"; }

# $1: URL, $2: CA file ("" for plain HTTP), $3: PID of the server process.
wait_healthy() {
  python - "$@" <<'EOF'
import os, ssl, sys, time, urllib.request
url, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca) if ca else None
deadline = time.time() + 60
while True:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            sys.exit(0 if response.status == 200 else 1)
    except OSError as err:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"the server process {pid} exited")
        if time.time() > deadline:
            sys.exit(f"{url} not healthy after 60 s: {err}")
        time.sleep(0.3)
EOF
}

online_nodes() {
  cli flwr supernode list "$connection" --format json | python -c \
    'import json,sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))'
}

# 1. TLS material and node keys (idempotent).
if ((insecure)); then
  connection="afl-local"
  link_tls=(--insecure)
  node_tls=(--insecure)
else
  connection="afl-local-tls"
  "$here/generate-certs.sh" "$certs_dir" "$nodes"
  link_tls=(--ssl-ca-certfile "$certs_dir/ca.crt" --ssl-certfile "$certs_dir/server.pem"
    --ssl-keyfile "$certs_dir/server.key" --enable-supernode-auth)
  node_tls=(--root-certificates "$certs_dir/ca.crt")
fi

# 2. The flwr CLI connection, in a private FLWR_HOME.
{
  printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "127.0.0.1:%s"\n' \
    "$connection" "$connection" "$port"
  if ((insecure)); then
    printf 'insecure = true\n'
  else
    printf 'root-certificates = "%s"\n' "$certs_dir/ca.crt"
  fi
} >"$work_dir/flwr-home/cli/config.toml"
echo "flwr CLI connection ($work_dir/flwr-home/cli/config.toml):"
sed 's/^/    /' "$work_dir/flwr-home/cli/config.toml"

# 3. SuperLink: one port for the Fleet, Control and Runtime APIs.
start superlink flower-superlink "${link_tls[@]}" --host 127.0.0.1 --port "$port" \
  --disable-runtime-dependency-installation
if ((insecure)); then
  url="http://127.0.0.1:$port/health" ca=""
else
  url="https://127.0.0.1:$port/health" ca="$certs_dir/ca.crt"
fi
wait_healthy "$url" "$ca" "${pids[0]}" || {
  tail -n 20 "$work_dir/logs/superlink.log" >&2
  die "the SuperLink did not start (log: $work_dir/logs/superlink.log)"
}

# 4. Register the SuperNodes' public keys (only registered nodes may connect).
if ((!insecure)); then
  for ((i = 0; i < nodes; i++)); do
    echo "+ flwr supernode register $certs_dir/supernode-$i.pub $connection"
    cli flwr supernode register "$certs_dir/supernode-$i.pub" "$connection"
  done
fi

# 5. SuperNodes, each with its own Runtime API port and data partition. With the
# warm launcher each node is one command: Flower's SuperExec with warm task
# processes (python -m afl_flwr.warm_exec), which starts the SuperNode after
# `--` in `process` isolation, exits with it and stops it when stopped. Unless
# --node-pull-interval is 3, the SuperNode is Flower's with that idle wait
# (python -m afl_flwr.supernode) instead of its fixed 3 s after every reply.
supernode=(flower-supernode)
[[ "$node_pull_interval" =~ ^0*3(\.0*)?$ ]] ||
  supernode=(python -m afl_flwr.supernode --idle-pull-interval "$node_pull_interval" -- flower-supernode)
for ((i = 0; i < nodes; i++)); do
  node_auth=() launcher=() isolation=()
  ((insecure)) || node_auth=(--auth-supernode-private-key "$certs_dir/supernode-$i")
  if [[ "$task_launcher" == warm ]]; then
    launcher=(python -m afl_flwr.warm_exec --insecure
      --runtime-api-address "127.0.0.1:$((node_base_port + i))" --)
    isolation=(--isolation process)
  fi
  start "supernode-$i" "${launcher[@]}" "${supernode[@]}" "${node_tls[@]}" "${node_auth[@]}" \
    --superlink "127.0.0.1:$port" --port "$((node_base_port + i))" "${isolation[@]}" \
    --node-config "partition-id=$i num-partitions=$nodes" \
    --max-retries 5 --max-wait-time 60
done
for _ in $(seq 60); do
  online="$(online_nodes)"
  ((online >= nodes)) && break
  for ((i = 0; i < nodes; i++)); do
    kill -0 "${pids[i + 1]}" 2>/dev/null || {
      tail -n 20 "$work_dir/logs/supernode-$i.log" >&2
      die "SuperNode $i exited (log: $work_dir/logs/supernode-$i.log)"
    }
  done
  sleep 1
done
((online >= nodes)) || die "only $online of $nodes SuperNodes online after 60 s"
echo "$online SuperNodes online"

# 6. The run; `flwr run --stream` returns when the run ends, whatever its status.
run_command=(flwr run "$app" "$connection" --stream "${run_args[@]}")
echo "+ $(shell_words "${run_command[@]}")"
cli "${run_command[@]}" || echo "flwr run exited with status $?"

status="$(cli flwr list "$connection" --format json | python -c \
  'import json,sys; print(" ".join(r["status"] for r in json.load(sys.stdin)["runs"]))')"
echo "Run status: $status"
if ((keep_running)); then
  echo "Still running: the SuperLink (127.0.0.1:$port) and $nodes SuperNode(s); Ctrl-C stops them."
  echo "Another run (resume one with --run-config \"resume-from='<checkpoint.npz>'\"):"
  echo "  FLWR_HOME=$(shell_words "$work_dir/flwr-home/cli") $(shell_words "${run_command[@]}")"
  wait "${pids[0]}" || true
  die "the SuperLink exited (log: $work_dir/logs/superlink.log)"
fi
[[ "$status" == "finished:completed" ]]
