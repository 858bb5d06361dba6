// The providers' official Node SDKs, unmodified, with their default hosts and retries: one call each.
// usage: node sdk_block.mjs openai|anthropic|gemini
// Prints one JSON line: {ok: true} or {ok: false, error: <class name>, status, message}.
import { createRequire } from "node:module";

const require = createRequire("/opt/enforcer-test/node/");
const provider = process.argv[2];

async function call() {
  if (provider === "openai") {
    const { OpenAI } = require("openai");
    const client = new OpenAI({ apiKey: "sk-proj-E2eNodeKey0123456789abcdefghijklmn" });
    await client.responses.create({ model: "gpt-5.4", input: "say hi" });
  } else if (provider === "anthropic") {
    const { Anthropic } = require("@anthropic-ai/sdk");
    const client = new Anthropic({ apiKey: "sk-ant-api03-E2eNodeKey0123456789abcdefghijklmn" });
    await client.messages.create({ model: "claude-sonnet-5", max_tokens: 64, messages: [{ role: "user", content: "say hi" }] });
  } else {
    const { GoogleGenAI } = require("@google/genai");
    const client = new GoogleGenAI({ apiKey: "AIzaSyE2eNodeKey0123456789abcdefghijklm" });
    await client.models.generateContent({ model: "gemini-3.5-flash", contents: "say hi" });
  }
}

try {
  await call();
  console.log(JSON.stringify({ ok: true }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, error: e?.constructor?.name, status: e?.status, message: String(e?.message) }));
}
