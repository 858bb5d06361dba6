// Node's own HTTP/2 client sending a request body only once the server answered `Expect: 100-continue` with
// `100 Continue` (the 'continue' event), as Node applications do for uploads. usage: node h2_expect.mjs URL BODY
// Prints one JSON line: {continued, status, body} or {error}; gives up after 20 s (without a 100 it would wait for
// ever).
import http2 from "node:http2";

const [url, body] = process.argv.slice(2);
const target = new URL(url);
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: "no answer within 20 s", continued }));
  process.exit(1);
}, 20000);
let continued = false;
const session = http2.connect(target.origin);
session.on("error", (e) => {
  console.log(JSON.stringify({ error: String(e) }));
  process.exit(1);
});
const req = session.request({
  ":method": "POST",
  ":path": target.pathname,
  "content-type": "text/plain",
  "content-length": Buffer.byteLength(body),
  expect: "100-continue",
});
req.on("continue", () => {
  continued = true;
  req.end(body);
});
let status = 0;
let text = "";
req.on("response", (headers) => {
  status = headers[":status"];
});
req.setEncoding("utf8");
req.on("data", (d) => (text += d));
req.on("end", () => {
  clearTimeout(timer);
  console.log(JSON.stringify({ continued, status, body: text }));
  session.close();
});
req.on("error", (e) => {
  clearTimeout(timer);
  console.log(JSON.stringify({ error: String(e), continued }));
  process.exit(1);
});
