#!/bin/sh
# The trustmesh image's entrypoint (deploy/docker/Dockerfile, compose.yaml):
#
#   trustmesh-entrypoint ca       init the CA on first start, make a one-time enrollment
#                                 token for each node of $TRUSTMESH_NODES that has none,
#                                 then `trustmesh ca serve`
#   trustmesh-entrypoint node     enroll with the token the CA left (first start only),
#                                 then `trustmesh node run`
#   trustmesh-entrypoint health   the healthcheck of either: GET /v1/health on the CA,
#                                 `trustmesh node health` on a node (see health below)
#   trustmesh-entrypoint trustmesh ARGS ...
#                                 trustmesh with the secret as its passphrase file:
#                                 docker compose exec ca trustmesh-entrypoint \
#                                     trustmesh ca list --dir /var/lib/trustmesh/ca
#   trustmesh-entrypoint CMD ...  anything else is run as is
#
# The keys' passphrase reaches trustmesh as a file, with the global option
# `trustmesh --passphrase-file FILE` (the Docker secret), never through the environment,
# where `docker inspect` and /proc/PID/environ would show it to anyone who may look.
#
# Without an argument the role is $TRUSTMESH_ROLE. The CA and the nodes share one volume,
# $TRUSTMESH_ENROLL_DIR: the CA writes the mesh root (ca.crt) and NODE.token files there,
# and a node that enrolled replaces its token with NODE.enrolled, so that the CA never
# makes it another. That volume is how this demo hands tokens over; in production hand
# each token to its node over a channel of your own (docs/operations.md).
#
# Every setting is an environment variable:
#   TRUSTMESH_PASSPHRASE_FILE  the keys' passphrase (default /run/secrets/trustmesh_passphrase),
#                              mode 0600 or 0400, readable by the image's user (uid 10001);
#                              without it, trustmesh falls back to $TRUSTMESH_PASSPHRASE
#   TRUSTMESH_STATE            the state volume (default /var/lib/trustmesh): ca/ or node/
#   TRUSTMESH_ENROLL_DIR       the shared enrollment volume (default /var/lib/trustmesh-enroll)
#   CA:   TRUSTMESH_NODES (node ids, space-separated), TRUSTMESH_CA_NAME, TRUSTMESH_CA_HOST
#         (0.0.0.0), TRUSTMESH_CA_PORT (8443), TRUSTMESH_CA_SANS (names the nodes and the
#         healthcheck dial: "ca 127.0.0.1"), TRUSTMESH_TOKEN_TTL (24h), TRUSTMESH_CA_ARGS
#         (more `ca serve` flags)
#   node: TRUSTMESH_NODE_ID, TRUSTMESH_CA_URL (https://ca:8443), TRUSTMESH_LISTEN
#         (0.0.0.0:7401), TRUSTMESH_API (127.0.0.1:7402), TRUSTMESH_ADVERTISE (the address
#         peers dial, e.g. node-1:7401), TRUSTMESH_BOOTSTRAP (HOST:PORT ..., space-separated),
#         TRUSTMESH_NODE_ARGS (more `node init` flags)
set -eu

STATE=${TRUSTMESH_STATE:-/var/lib/trustmesh}
ENROLL=${TRUSTMESH_ENROLL_DIR:-/var/lib/trustmesh-enroll}
PASSPHRASE_FILE=${TRUSTMESH_PASSPHRASE_FILE:-/run/secrets/trustmesh_passphrase}
CA_PORT=${TRUSTMESH_CA_PORT:-8443}

say() {
    printf 'trustmesh-entrypoint: %s\n' "$*" >&2
}

die() {
    say "$*"
    exit 1
}

# $SECRET: the passphrase file when it can be read, else empty; every trustmesh command
# below takes it as ${SECRET:+--passphrase-file "$SECRET"}.
SECRET=
if [ -r "$PASSPHRASE_FILE" ]; then
    SECRET=$PASSPHRASE_FILE
fi

need_passphrase() {
    if [ -z "$SECRET" ] && [ -z "${TRUSTMESH_PASSPHRASE:-}" ]; then
        die "no passphrase: mount a secret at $PASSPHRASE_FILE"
    fi
}

# Write stdin to $1 whole: a reader sees the old file or the new one, never half of one.
write_file() {
    tmp="$1.tmp.$$"
    (umask 077 && cat >"$tmp")
    mv -f "$tmp" "$1"
}

run_ca() {
    dir=$STATE/ca
    if [ ! -f "$dir/ca.crt" ]; then
        say "first start: creating the CA in $dir"
        trustmesh ${SECRET:+--passphrase-file "$SECRET"} ca init --dir "$dir" \
            --name "${TRUSTMESH_CA_NAME:-trustmesh compose mesh}"
    fi
    mkdir -p "$ENROLL"
    write_file "$ENROLL/ca.crt" <"$dir/ca.crt"
    for node_id in ${TRUSTMESH_NODES:-}; do
        if [ -e "$ENROLL/$node_id.token" ] || [ -e "$ENROLL/$node_id.enrolled" ]; then
            continue
        fi
        say "an enrollment token for $node_id"
        # Made first, then written: a failed command must leave no (empty) token file,
        # which would stop every later start from making one (sh has no pipefail).
        token=$(trustmesh ${SECRET:+--passphrase-file "$SECRET"} ca token create --dir "$dir" \
            --node-id "$node_id" --ttl "${TRUSTMESH_TOKEN_TTL:-24h}")
        printf '%s\n' "$token" | write_file "$ENROLL/$node_id.token"
    done
    set -- --dir "$dir" --host "${TRUSTMESH_CA_HOST:-0.0.0.0}" --port "$CA_PORT"
    for name in ${TRUSTMESH_CA_SANS:-ca 127.0.0.1}; do
        set -- "$@" --san "$name"
    done
    # shellcheck disable=SC2086 # TRUSTMESH_CA_ARGS is a list of flags: split on purpose
    exec trustmesh ${SECRET:+--passphrase-file "$SECRET"} ca serve "$@" ${TRUSTMESH_CA_ARGS:-}
}

run_node() {
    node_id=${TRUSTMESH_NODE_ID:?set TRUSTMESH_NODE_ID to the node id}
    dir=$STATE/node
    if [ ! -f "$dir/node.toml" ]; then
        token_file=$ENROLL/$node_id.token
        [ -r "$token_file" ] || die "no enrollment token for $node_id in $token_file"
        [ -r "$ENROLL/ca.crt" ] || die "no mesh root in $ENROLL/ca.crt"
        set -- --dir "$dir" --node-id "$node_id" --token "$(cat "$token_file")" \
            --ca-url "${TRUSTMESH_CA_URL:-https://ca:8443}" --ca-cert "$ENROLL/ca.crt" \
            --listen "${TRUSTMESH_LISTEN:-0.0.0.0:7401}" --api "${TRUSTMESH_API:-127.0.0.1:7402}"
        if [ -n "${TRUSTMESH_ADVERTISE:-}" ]; then
            set -- "$@" --advertise "$TRUSTMESH_ADVERTISE"
        fi
        for peer in ${TRUSTMESH_BOOTSTRAP:-}; do
            set -- "$@" --bootstrap "$peer"
        done
        say "first start: enrolling $node_id with ${TRUSTMESH_CA_URL:-https://ca:8443}"
        # shellcheck disable=SC2086 # TRUSTMESH_NODE_ARGS is a list of flags: split on purpose
        trustmesh ${SECRET:+--passphrase-file "$SECRET"} node init "$@" ${TRUSTMESH_NODE_ARGS:-}
        : | write_file "$ENROLL/$node_id.enrolled"
        rm -f "$token_file"
    fi
    exec trustmesh ${SECRET:+--passphrase-file "$SECRET"} node run --dir "$dir"
}

health() {
    case ${TRUSTMESH_ROLE:-} in
    ca)
        python3 - "$STATE/ca/ca.crt" "https://127.0.0.1:$CA_PORT/v1/health" <<'EOF'
import ssl
import sys
import urllib.request

context = ssl.create_default_context(cafile=sys.argv[1])
with urllib.request.urlopen(sys.argv[2], context=context, timeout=5) as answer:
    sys.stdout.write(answer.read().decode() + "\n")
EOF
        ;;
    node)
        # Healthy while the node answers and can take part in the mesh: its status "ok"
        # or "degraded". `node health` exits 1 for "degraded" too (no link up, no CRL or
        # a stale one), and the first node of a mesh has no link until another dials it:
        # marking it unhealthy would only mislead (nothing restarts an unhealthy
        # container, and a restart makes no link). "failing" (its certificate expired,
        # or the CA revoked it) and no answer at all are unhealthy. No passphrase: the
        # node's read-only socket answers.
        if answer=$(trustmesh node health --dir "$STATE/node" --json); then
            printf '%s\n' "$answer"
            return 0
        fi
        printf '%s\n' "$answer"
        case $answer in
        *'"status":"degraded"'*) return 0 ;; # --json is compact: one "status", at the top
        esac
        return 1
        ;;
    *)
        die "set TRUSTMESH_ROLE to ca or node"
        ;;
    esac
}

role=${1:-${TRUSTMESH_ROLE:-}}
case $role in
ca)
    need_passphrase
    run_ca
    ;;
node)
    need_passphrase
    run_node
    ;;
health)
    health
    ;;
"")
    die "give a role (ca, node or health) or set TRUSTMESH_ROLE"
    ;;
trustmesh)
    shift
    exec trustmesh ${SECRET:+--passphrase-file "$SECRET"} "$@"
    ;;
*)
    exec "$@"
    ;;
esac
