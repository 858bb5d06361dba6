// Node's built-in fetch (undici), unmodified, as an agent would use it. Run through `enforcer exec`, which sets
// NODE_EXTRA_CA_CERTS. usage: node fetch.mjs URL [METHOD BODY [stream]]
// With `stream` the body is a ReadableStream sent in two pieces (chunked transfer encoding, no Content-Length).
// Prints one JSON line: {status, should_retry, body} or {error}.
const [url, method = "GET", body, mode] = process.argv.slice(2);
try {
  const init = { method };
  if (body !== undefined) {
    init.body = body;
    if (mode === "stream") {
      const half = Math.floor(body.length / 2);
      const enc = new TextEncoder();
      init.body = new ReadableStream({
        start(controller) {
          controller.enqueue(enc.encode(body.slice(0, half)));
          controller.enqueue(enc.encode(body.slice(half)));
          controller.close();
        },
      });
      init.duplex = "half";
    }
    init.headers = { "content-type": "application/json", authorization: "Bearer e2e-not-a-real-key" };
  }
  const res = await fetch(url, init);
  const text = await res.text();
  console.log(JSON.stringify({ status: res.status, should_retry: res.headers.get("x-should-retry"), body: text }));
} catch (e) {
  console.log(JSON.stringify({ error: String(e), cause: String(e.cause) }));
  process.exitCode = 1;
}
