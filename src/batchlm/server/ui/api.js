// The page's calls to this server: /health, /v1/models and streaming /v1/chat/completions.

// The server's root: the folder above this module's (ui/), so that the calls reach the server
// wherever a reverse proxy serves it (https://host/llm/ as well as https://host/).
const ROOT = new URL("../", import.meta.url);

function url(path) {
  return new URL(path, ROOT);
}

export class ApiError extends Error {
  // status: the HTTP status, or 0 when the server could not be reached.
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(apiKey) {
  const out = { "Content-Type": "application/json" };
  if (apiKey) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function send(url, init) {
  try {
    return await fetch(url, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server.");
  }
}

const CONNECTION_LOST = "The connection to the server was lost before the reply ended.";

// The OpenAI-shaped error of a failed response, as an ApiError.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON (a proxy's page): keep the status line
  }
  return new ApiError(response.status, message, code);
}

// A server that takes longer than this to answer /health is hung (a stopped process, a dead link).
const HEALTH_TIMEOUT_MS = 10000;

// "ok", "loading", "shutting_down", "dead", "unreachable", or "not_responding".
export async function checkHealth() {
  try {
    const signal = AbortSignal.timeout(HEALTH_TIMEOUT_MS);
    const response = await fetch(url("health"), { cache: "no-store", signal });
    if (response.ok) return "ok";
    const body = await response.json().catch(() => ({}));
    return body.status || "loading";
  } catch (error) {
    return error.name === "TimeoutError" ? "not_responding" : "unreachable";
  }
}

export async function listModels(apiKey) {
  const response = await send(url("v1/models"), { headers: headers(apiKey), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return body.data.map((card) => card.id);
}

// Streams one chat completion. onDelta(text, field) gets each piece of the reply as it arrives, field
// "content" or "reasoning" (a reasoning model's thinking); the result is
// { finishReason, usage, firstTokenAt, endedAt } (times from performance.now()).
export async function streamChat({ model, messages, settings, signal, onDelta }) {
  const body = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  // Left unset, the server samples as the model recommends (its generation_config.json).
  if (settings.temperature != null) body.temperature = settings.temperature;
  if (settings.topP != null) body.top_p = settings.topP;
  if (settings.maxTokens) body.max_tokens = settings.maxTokens;
  const init = { method: "POST", headers: headers(settings.apiKey), body: JSON.stringify(body), signal };
  const response = await send(url("v1/chat/completions"), init);
  if (!response.ok) throw await errorOf(response);
  const result = { finishReason: null, usage: null, firstTokenAt: null, endedAt: null };
  let finished = false;
  for await (const event of serverSentEvents(response.body)) {
    if (event === "[DONE]") {
      finished = true;
      break;
    }
    takeChunk(JSON.parse(event), result, onDelta);
  }
  // The server ends every stream with [DONE]; a stream closed without it was cut short.
  if (!finished) throw new ApiError(0, CONNECTION_LOST);
  result.endedAt = performance.now();
  return result;
}

function takeChunk(chunk, result, onDelta) {
  if (chunk.error) throw new ApiError(chunk.error.code === "queue_full" ? 429 : 500, chunk.error.message);
  if (chunk.usage) result.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const delta = choice.delta || {};
  for (const [field, text] of [["reasoning", delta.reasoning_content], ["content", delta.content]]) {
    if (!text) continue;
    result.firstTokenAt = result.firstTokenAt ?? performance.now();
    onDelta(text, field);
  }
  if (choice.finish_reason) result.finishReason = choice.finish_reason;
}

// The data fields of a text/event-stream body, one string per event.
async function* serverSentEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await readOrLost(reader);
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = dataOf(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (data !== null) yield data;
    }
  }
}

// A read that fails other than by the user's Stop means the connection broke (the server died).
async function readOrLost(reader) {
  try {
    return await reader.read();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, CONNECTION_LOST);
  }
}

function dataOf(event) {
  const lines = event.split("\n").filter((line) => line.startsWith("data:"));
  if (!lines.length) return null;
  return lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
}

// Token counts from the server's usage. The speed counts the tokens after the first over the time
// after it arrived, so the prompt's processing does not lower it.
export function replyStats(result, startedAt) {
  const usage = result.usage || {};
  const stats = { finishReason: result.finishReason };
  if (Number.isFinite(usage.prompt_tokens)) stats.promptTokens = usage.prompt_tokens;
  if (!Number.isFinite(usage.completion_tokens)) return stats;
  const tokens = usage.completion_tokens;
  stats.completionTokens = tokens;
  const decoding = result.firstTokenAt === null ? 0 : (result.endedAt - result.firstTokenAt) / 1000;
  const total = (result.endedAt - startedAt) / 1000;
  if (tokens > 1 && decoding > 0) stats.tokensPerSecond = (tokens - 1) / decoding;
  else if (tokens > 0 && total > 0) stats.tokensPerSecond = tokens / total;
  return stats;
}

// What to tell the user about a failed call.
export function describeError(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message || error}`;
  switch (error.status) {
    case 0:
      return `${error.message} Is batchlm serve still running?`;
    case 401:
      return "This server needs an API key, or the key given is wrong: enter it under Settings.";
    case 429:
      return "The server is overloaded (too many requests waiting). Try again in a moment.";
    case 503:
      return `The server is not ready: ${error.message}`;
    default:
      return error.message;
  }
}
