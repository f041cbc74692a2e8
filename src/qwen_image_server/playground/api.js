// Talking to the server: the API key, JSON calls, streamed image requests (server-sent
// events over fetch, so that aborting the fetch closes the stream and cancels the job),
// and automatic retries when the server says it is busy.

const KEY_STORAGE = "qis.playground.apiKey";
// 503 codes after which the same request is sent again once Retry-After has passed.
const RETRYABLE = new Set(["queue_full", "too_many_connections", "shutting_down"]);

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(value) {
  if (value) localStorage.setItem(KEY_STORAGE, value);
  else localStorage.removeItem(KEY_STORAGE);
}

// An error in OpenAI's envelope ({"error": {message, type, param, code}}), with the HTTP
// status and the Retry-After seconds when the server sent them.
export class ApiError extends Error {
  constructor(status, error, retryAfter = null) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.param = error.param || null;
    this.code = error.code || null;
    this.retryAfter = retryAfter;
  }

  get retryable() {
    return this.status === 503 && RETRYABLE.has(this.code);
  }
}

// A key an HTTP header can carry: printable ASCII (fetch refused others with a message the page showed as the
// server being unreachable).
export function keyProblem(key) {
  return /^[\x20-\x7e]*$/.test(key) ? null : "This key holds characters an HTTP header cannot carry (a pasted space or accent?)";
}

function headers(extra = {}) {
  const key = apiKey();
  const problem = keyProblem(key);
  if (problem) throw new ApiError(401, { message: problem, code: "invalid_api_key" });
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status line says what happened
  }
  const error = body && body.error ? body.error : { message: `${response.status} ${response.statusText}`.trim() };
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, error, Number.isFinite(retry) ? retry : null);
}

export async function getJSON(path, { signal } = {}) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// JSON text of a request body; a BigInt (a seed past 2^53) goes as its digits.
export function toJSON(body) {
  const mark = `bigint-${Math.random().toString(36).slice(2)}${Date.now()}:`; // no text of the request holds it
  const text = JSON.stringify(body, (key, value) => (typeof value === "bigint" ? `${mark}${value}` : value));
  return text.replaceAll(new RegExp(`"${mark}(\\d+)"`, "g"), "$1");
}

// A response's JSON with its seeds exact: one past 2^53 as a BigInt (from the text itself, where the browser gives it).
export function fromJSON(text) {
  return JSON.parse(text, (key, value, context) =>
    key === "seed" && typeof value === "number" && !Number.isSafeInteger(value) && context?.source ? BigInt(context.source) : value,
  );
}

// One server-sent event block ("event: x\ndata: {...}") as {event, data}.
function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { event, data: fromJSON(data.join("\n")) } : null;
}

// POST an image request with stream=true. `body` is a plain object (sent as JSON) or a
// FormData (multipart). Calls onPartial(event) for each preview and returns the
// completed events. Aborting `signal` closes the stream, which stops the server's work.
export async function streamImages(path, body, { signal, onPartial, onCompleted } = {}) {
  const json = !(body instanceof FormData);
  const response = await fetch(path, {
    method: "POST",
    headers: headers(json ? { "Content-Type": "application/json", Accept: "text/event-stream" } : { Accept: "text/event-stream" }),
    body: json ? toJSON(body) : body,
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  if (!(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    const whole = fromJSON(await response.text()); // a server that answered without streaming
    return whole.data.map((item, index) => ({ ...item, image_index: index, output_format: whole.output_format, size: whole.size }));
  }
  const completed = [];
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (!parsed) continue;
      const { event, data } = parsed;
      if (event === "error" || data.type === "error") throw new ApiError(500, data.error || {});
      if (event.endsWith(".partial_image")) onPartial?.(data);
      else if (event.endsWith(".completed")) {
        completed.push(data);
        onCompleted?.(data);
      }
    }
  }
  if (!completed.length) throw new ApiError(500, { message: "The stream ended without an image", type: "server_error" });
  return completed;
}

// Resolves after `seconds`, calling tick(secondsLeft) once a second; rejects if aborted.
function countdown(seconds, signal, tick) {
  return new Promise((resolve, reject) => {
    let left = seconds;
    tick(left);
    const timer = setInterval(() => {
      left -= 1;
      if (left <= 0) {
        clearInterval(timer);
        resolve();
      } else tick(left);
    }, 1000);
    signal?.addEventListener("abort", () => {
      clearInterval(timer);
      reject(new DOMException("Aborted", "AbortError"));
    });
  });
}

// Run `attempt()`; while the server answers busy (503 with Retry-After), wait as long as
// it asks (onWait(seconds) each second) and try again, until it succeeds or is aborted.
export async function withRetry(attempt, { signal, onWait } = {}) {
  for (;;) {
    try {
      return await attempt();
    } catch (error) {
      if (!(error instanceof ApiError) || !error.retryable || signal?.aborted) throw error;
      await countdown(Math.max(1, error.retryAfter || 1), signal, (left) => onWait?.(left, error));
    }
  }
}
