#!/usr/bin/env bash
# Submit an experiment or CLI run to a Ray cluster as a Ray job (`ray job submit`), wait for it,
# and say how it ended and where its results are.
#
#   scripts/submit.sh [--address URL] [--results DIR] [--submission-id ID] [--no-wait] -- COMMAND...
#
#   scripts/submit.sh --address http://head:8265 --results /shared/runs/mnist -- \
#       python -m lsgd_ray train --address auto --dataset digits --output-dir {results}
#
# The repository (without .venv, runs, .git, notebooks, experiment results) is uploaded as the
# job's working directory; COMMAND runs there, on the head node, with the Python found on the PATH
# of the process that ran `ray start` (start the cluster from the environment where lsgd-ray is
# installed). `{results}` in COMMAND becomes the results directory (also in $LSGD_RAY_RESULTS):
# an absolute path the job writes to, by default runs/jobs/<submission id> in this checkout. The
# job writes it on the head node: on a multi-node cluster give a path on shared storage, or fetch
# it from the head node. Relative paths the command writes to land in the job's temporary copy
# of the repository, which Ray deletes.
set -euo pipefail

usage() {
    sed -n '2,17s/^# \{0,1\}//p' "$0"
}

die() {
    echo "submit.sh: error: $*" >&2
    exit 2
}

json_string() {  # $1 as a JSON string literal
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

invoked_from=$PWD
cd "$(dirname "$0")/.."

address="" results="" submission_id="" no_wait=0
while (($#)); do
    case "$1" in
        --address | --results | --submission-id)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --address) address=$2 ;;
                --results) results=$2 ;;
                --submission-id) submission_id=$2 ;;
            esac
            shift 2
            ;;
        --address=*) address=${1#*=}; shift ;;
        --results=*) results=${1#*=}; shift ;;
        --submission-id=*) submission_id=${1#*=}; shift ;;
        --no-wait) no_wait=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (the command to run goes after --; see --help)" ;;
    esac
done
(($#)) || die "no command to run: scripts/submit.sh [options] -- COMMAND... (see --help)"

# The ray CLI: $RAY, else this checkout's .venv, else the one on PATH.
ray_cli=${RAY:-}
if [[ -z $ray_cli ]]; then
    if [[ -x .venv/bin/ray ]]; then ray_cli=$PWD/.venv/bin/ray; else ray_cli=$(command -v ray) || die "no 'ray' command found (set RAY=/path/to/ray)"; fi
fi

# Where the job server is: --address, else what `ray job submit` itself would use.
address=${address:-${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}}
addr=(--address "$address")

# Token authentication (Ray >= 2.60): `ray start` turns it on when ~/.ray/auth_token exists and
# RAY_AUTH_MODE is unset, but the job client only sends the token when RAY_AUTH_MODE=token. Do
# the same as `ray start` here; sending a token to a cluster without authentication is harmless.
if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -n ${RAY_AUTH_TOKEN_PATH:-} || -s $HOME/.ray/auth_token ]]; then
    export RAY_AUTH_MODE=token
fi

submission_id=${submission_id:-lsgd-$(date +%Y%m%d-%H%M%S)-$(printf '%04x' "$RANDOM")}
results=${results:-$PWD/runs/jobs/$submission_id}
[[ $results == /* ]] || results=$invoked_from/$results

command=()
uses_results=0 has_address=0 is_lsgd=0
for arg in "$@"; do
    [[ $arg == *"{results}"* ]] && uses_results=1
    [[ $arg == --address || $arg == --address=* ]] && has_address=1
    [[ $arg == lsgd_ray || $arg == *lsgd-ray || $arg == *compare.py || $arg == *lsgd_seeds.py ]] && is_lsgd=1
    command+=("${arg//\{results\}/$results}")
done
if ((!uses_results)); then
    echo "submit.sh: note: the command does not mention {results}; results go wherever it writes them" \
        "(relative paths: into the job's temporary working directory, which Ray deletes)" >&2
fi
if ((is_lsgd && !has_address)); then
    echo "submit.sh: warning: no --address in the command: lsgd-ray then starts its own Ray inside the" \
        "job instead of using the cluster's resources (pass --address auto)" >&2
fi

# Not uploaded (gitignore syntax; Ray also skips what .gitignore lists). The first four are Ray's
# own default excludes, which are therefore switched off below (and with them its warning about them).
excludes='[".git", ".venv", "venv", "__pycache__", "/runs", "*.egg-info", ".pytest_cache", ".ruff_cache",
 "/notebooks", ".ipynb_checkpoints", "/experiments/results", "/build", "/dist", "/.whl", "/.gl"]'
runtime_env="{\"excludes\": $excludes, \"env_vars\": {\"LSGD_RAY_RESULTS\": $(json_string "$results"),
 \"LSGD_RAY_SUBMISSION_ID\": $(json_string "$submission_id"), \"PYTHONUNBUFFERED\": \"1\"}}"

echo "submit.sh: job $submission_id -> $address; results: $results"
wait_args=()
((no_wait)) && wait_args=(--no-wait)
trap 'echo "submit.sh: interrupted; job $submission_id keeps running (stop it: $ray_cli job stop --address $address $submission_id)" >&2; exit 130' INT
submit_rc=0
RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES="" "$ray_cli" job submit "${addr[@]}" --submission-id "$submission_id" --working-dir . \
    --runtime-env-json "$runtime_env" "${wait_args[@]}" -- "${command[@]}" || submit_rc=$?
trap - INT

if ((no_wait)); then
    ((submit_rc == 0)) || exit "$submit_rc"
    echo "submit.sh: submitted $submission_id (not waiting)"
    echo "  status:  $ray_cli job status --address $address $submission_id"
    echo "  logs:    $ray_cli job logs --follow --address $address $submission_id"
    echo "  results: $results"
    exit 0
fi

if ! status_text=$("$ray_cli" job status "${addr[@]}" "$submission_id" 2>&1); then
    echo "submit.sh: job $submission_id was not submitted or cannot be queried (ray job submit exit code" \
        "$submit_rc; its error is above): ${status_text##*$'\n'}" >&2
    exit $((submit_rc ? submit_rc : 1))
fi
case "$status_text" in
    *"Job '$submission_id' succeeded"*) status=SUCCEEDED ;;
    *"Job '$submission_id' failed"*) status=FAILED ;;
    *"Job '$submission_id' was stopped"*) status=STOPPED ;;
    *"Status for job '$submission_id': "*)
        status=${status_text##*"Status for job '$submission_id': "}
        status=${status%%[[:space:]]*}
        ;;
    *) status="UNKNOWN (ray job status said: ${status_text##*$'\n'})" ;;
esac

# A copy of the job's output beside its results (written here, on the submitting machine).
log_note="not saved here (see: $ray_cli job logs --address $address $submission_id)"
if log_text=$("$ray_cli" job logs "${addr[@]}" "$submission_id" 2>/dev/null) && mkdir -p "$results" 2>/dev/null &&
    printf '%s\n' "$log_text" >"$results/job.log"; then
    log_note=$results/job.log
fi

echo "submit.sh: submission id: $submission_id"
echo "submit.sh: status:        $status"
echo "submit.sh: results:       $results (written on the head node: shared storage, or fetch it from there)"
echo "submit.sh: job log:       $log_note"
[[ $status == SUCCEEDED ]]
