//! Inspect: classifies a request's protocol (plain HTTP, OpenAI, Anthropic, Gemini, MCP JSON-RPC) and fills the
//! `llm` and `mcp` parts of the `Action`. Pure functions over plain data.
