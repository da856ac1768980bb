/**
 * stockade's TypeScript client: the Python client's surface (docs/client.md) for Node.js
 * (18 and later) and browsers, on `fetch` alone. Runs, output streamed as an async
 * iterator (server-sent events read from fetch's stream), sessions, files both ways.
 * Errors carry the API's code, field and request id; refusals made before anything ran
 * are retried after their Retry-After (3 tries, 60 s at most).
 */

export type Status =
  | "ok" | "runtime_error" | "signaled" | "time_limit" | "wall_time_limit" | "memory_limit"
  | "output_limit" | "file_size_limit" | "internal_error";

export interface Limits {
  cpu_time_s?: number;
  wall_time_s?: number;
  memory_mib?: number;
  processes?: number;
  output_kib?: number;
  file_size_kib?: number;
}

export interface FileIn {
  name: string;
  content: string;
  encoding?: "utf8" | "base64";
}

export interface OutFile {
  name: string;
  content: string;
  encoding: "utf8" | "base64";
}

export interface Result {
  status: Status;
  exit_code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  stdout_truncated: boolean;
  stderr_truncated: boolean;
  cpu_time_s: number;
  wall_time_s: number;
  memory_peak_kib: number;
  message: string;
  files: OutFile[];
  files_truncated: boolean;
}

export interface RichOutput {
  mime: "text/plain" | "text/html" | "image/png";
  data: string;
  encoding: "utf8" | "base64";
}

export interface CellResult extends Result {
  outputs: RichOutput[];
  outputs_truncated: boolean;
  session_ended: boolean;
}

export interface SessionInfo {
  id: string;
  state: "idle" | "running";
  created_at: string;
  expires_at: string;
  idle_timeout_s: number;
  ttl_s: number;
  cpu_total_s: number;
  limits: Required<Limits>;
  calls: number;
  cpu_time_s: number;
  memory_peak_kib: number;
}

export interface FileEntry {
  name: string;
  size: number;
}

export interface EnvironmentInfo {
  name: string;
  language: string;
  version: string;
  description: string;
  default: boolean;
  packages: { name: string; version: string }[];
  preloaded: string[];
}

export interface Environments {
  default: string;
  environments: EnvironmentInfo[];
}

/** A chunk of a streamed run's output, as the program wrote it. */
export interface Output {
  stream: "stdout" | "stderr";
  text: string;
}

export interface RunOptions {
  stdin?: string;
  args?: string[];
  /** name -> content: a string goes as UTF-8 text, bytes as base64. Or FileIn records. */
  files?: Record<string, string | Uint8Array> | FileIn[];
  environment?: string;
  limits?: Limits;
  /** Sent as Idempotency-Key; lets a call whose connection was lost be sent again. */
  idempotencyKey?: string;
}

export interface SessionOptions {
  limits?: Limits;
  idle_timeout_s?: number;
  ttl_s?: number;
  cpu_total_s?: number;
  files?: Record<string, string | Uint8Array>;
}

export interface ClientOptions {
  /** The API key (none for a runner on loopback that serves callers without one). */
  key?: string;
  /** Retry refusals made before anything ran (default true). */
  retries?: boolean;
  /** Per call, in milliseconds (default 700 s: past the largest wall time a runner allows). */
  timeoutMs?: number;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

/** A call to a runner failed. */
export class StockadeError extends Error {
  override name = "StockadeError";
}

/** The runner refused the request (HTTP 4xx or 5xx), and said why. */
export class ApiError extends StockadeError {
  override name = "ApiError";
  constructor(
    readonly status: number,
    readonly code: string,
    readonly detail: string,
    readonly field: string | null = null,
    readonly requestId: string | null = null,
    readonly retryAfter: number | null = null,
  ) {
    super(`${code}${field ? ` (${field})` : ""}: ${detail} [HTTP ${status}` +
          `${requestId ? `; request ${requestId}` : ""}]`);
  }

  /** Refused before anything ran (a busy or rate-limited runner's own 429 or 503). */
  get beforeStart(): boolean {
    return (this.status === 429 || this.status === 503) && this.code !== "http_error";
  }
}

/** No answer: the runner could not be reached, or the connection failed. */
export class TransportError extends StockadeError {
  override name = "TransportError";
  constructor(message: string, readonly sent: boolean) {
    super(message);
  }
}

/** The runner's answer is not what the API documents (or is over the client's cap). */
export class AnswerError extends StockadeError {
  override name = "AnswerError";
}

export const MAX_ANSWER = 256 * 1024 * 1024;
export const MAX_TRIES = 3;
export const RETRY_BUDGET_MS = 60_000;
const STREAM_TYPE = "text/event-stream";

interface Call {
  method: string;
  path: string;
  body?: string | Uint8Array;
  contentType?: string;
  idempotencyKey?: string;
  stream?: boolean;
}

/** Seconds a Retry-After gives (a number, or an HTTP date), if any. */
export function retryAfter(value: string | null): number | null {
  if (!value) return null;
  const seconds = Number(value);
  if (value.trim() !== "" && Number.isFinite(seconds)) return Math.max(0, seconds);
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

/** Milliseconds to wait before another try of `call` after `error`, or null: none. */
export function retryDelay(call: Call, error: unknown, tries: number, elapsedMs: number,
                           enabled = true): number | null {
  if (!enabled || tries >= MAX_TRIES) return null;
  const backoff = 500 * 2 ** (tries - 1);
  let wait: number;
  if (error instanceof ApiError) {
    if (!error.beforeStart) return null;
    wait = error.retryAfter !== null ? error.retryAfter * 1000 : backoff;
  } else if (error instanceof TransportError) {
    if (error.sent && call.method !== "GET" && !call.idempotencyKey) return null;
    wait = backoff;
  } else {
    return null;
  }
  return elapsedMs + wait > RETRY_BUDGET_MS ? null : wait;
}

function safeParts(name: string): string[] {
  const parts = name.split("/");
  if (!name || name.includes("\0") || parts.some((p) => p === "" || p === "." || p === "..")) {
    throw new TypeError(`unsafe file name: ${JSON.stringify(name)} (a relative path, ` +
                        "no '.' or '..')");
  }
  return parts;
}

function base64(bytes: Uint8Array): string {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/** An out/ file's content. */
export function fileBytes(file: OutFile): Uint8Array {
  if (file.encoding === "utf8") return new TextEncoder().encode(file.content);
  return Uint8Array.from(atob(file.content), (c) => c.charCodeAt(0));
}

function inputFiles(files: RunOptions["files"]): FileIn[] {
  if (!files) return [];
  if (Array.isArray(files)) return files;
  return Object.entries(files).map(([name, content]) => typeof content === "string"
    ? { name, content, encoding: "utf8" as const }
    : { name, content: base64(content), encoding: "base64" as const });
}

function json(method: string, path: string, body: unknown, extra: Partial<Call> = {}): Call {
  return { method, path, body: JSON.stringify(body), contentType: "application/json", ...extra };
}

async function readCapped(response: Response): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  if (response.body) {
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      total += chunk.length;
      if (total > MAX_ANSWER) {
        await response.body.cancel();
        throw new AnswerError(`the runner's answer is over the client's ${MAX_ANSWER >> 20} MiB cap`);
      }
      chunks.push(chunk);
    }
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    all.set(chunk, at);
    at += chunk.length;
  }
  return all;
}

async function refusal(response: Response): Promise<ApiError> {
  const requestId = response.headers.get("x-request-id");
  const after = retryAfter(response.headers.get("retry-after"));
  const raw = new TextDecoder().decode(await readCapped(response));
  try {
    const error = JSON.parse(raw).error;
    if (typeof error?.code === "string" && typeof error?.message === "string") {
      return new ApiError(response.status, error.code, error.message, error.field ?? null,
                          error.request_id ?? requestId, after);
    }
  } catch {
    // not the runner's error body
  }
  return new ApiError(response.status, "http_error", `the runner answered HTTP ${response.status}`,
                      null, requestId, after);
}

function decode<T>(raw: Uint8Array, call: Call): T {
  try {
    return JSON.parse(new TextDecoder().decode(raw)) as T;
  } catch (error) {
    throw new AnswerError(`the runner's answer to ${call.method} ${call.path} is not JSON: ${error}`);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A runner at `url`, called with `options.key`. */
export class Client {
  readonly url: string;
  readonly key: string | undefined;
  readonly retries: boolean;
  readonly timeoutMs: number;
  private readonly fetch: typeof fetch;

  constructor(url = "http://127.0.0.1:8080", options: ClientOptions = {}) {
    if (!/^https?:\/\//.test(url)) {
      throw new TypeError(`a runner's URL is http:// or https://, not ${JSON.stringify(url)}`);
    }
    this.url = url.replace(/\/+$/, "");
    this.key = options.key;
    this.retries = options.retries ?? true;
    this.timeoutMs = options.timeoutMs ?? 700_000;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** Run `code` once, confined: its record (a program's failure is a result, not an error). */
  run(code: string, options: RunOptions = {}): Promise<Result> {
    return this.call<Result>(this.runCall(code, options, false));
  }

  /** Run `code`, its output as it is written: `for await` the Outputs, then `result`. */
  stream(code: string, options: RunOptions = {}): RunStream<Result> {
    return new RunStream<Result>(this, this.runCall(code, options, true));
  }

  /** A new session (end it with `end()`), with `files` written into its directory. */
  async session(options: SessionOptions = {}): Promise<Session> {
    const { files, ...terms } = options;
    const info = await this.call<SessionInfo>(json("POST", "/v1/sessions", terms));
    const session = new Session(this, info);
    try {
      for (const [name, content] of Object.entries(files ?? {})) {
        await session.upload(name, content);
      }
    } catch (error) {
      await session.end();
      throw error;
    }
    return session;
  }

  /** A session of the caller's that exists already, by its id. */
  async attach(id: string): Promise<Session> {
    return new Session(this, await this.call<SessionInfo>(
      { method: "GET", path: sessionPath(id) }));
  }

  async sessions(): Promise<SessionInfo[]> {
    return (await this.call<{ sessions: SessionInfo[] }>(
      { method: "GET", path: "/v1/sessions" })).sessions;
  }

  environments(): Promise<Environments> {
    return this.call<Environments>({ method: "GET", path: "/v1/environments" });
  }

  private runCall(code: string, options: RunOptions, stream: boolean): Call {
    const body = {
      code, stdin: options.stdin ?? "", args: options.args ?? [],
      files: inputFiles(options.files), environment: options.environment ?? null,
      limits: options.limits ?? null,
    };
    return json("POST", "/v1/runs", body, { stream, idempotencyKey: options.idempotencyKey });
  }

  /** One API call, retried as `retryDelay` allows; its JSON answer (raw: its bytes). */
  async call<T>(call: Call, raw = false): Promise<T> {
    const response = await this.open(call);
    const body = await readCapped(response);
    if (raw) return body as T;
    return response.status === 204 ? (undefined as T) : decode<T>(body, call);
  }

  /** `call` sent and answered with a status below 400 (retried as allowed): its response. */
  async open(call: Call): Promise<Response> {
    const started = Date.now();
    for (let tries = 1; ; tries++) {
      let error: unknown;
      try {
        const response = await this.send(call);
        if (response.status < 400) return response;
        error = await refusal(response);
      } catch (caught) {
        error = caught;
      }
      const wait = retryDelay(call, error, tries, Date.now() - started, this.retries);
      if (wait === null) throw error;
      await sleep(wait);
    }
  }

  private async send(call: Call): Promise<Response> {
    const headers: Record<string, string> = {
      Accept: call.stream ? STREAM_TYPE : "application/json",
    };
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    if (call.contentType) headers["Content-Type"] = call.contentType;
    if (call.idempotencyKey) headers["Idempotency-Key"] = call.idempotencyKey;
    try {
      return await this.fetch(this.url + call.path, {
        method: call.method, headers, body: call.body as BodyInit | undefined, redirect: "error",
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (error) {
      // fetch does not say whether the request left: only a refused connection did not.
      const cause = (error as { cause?: { code?: string } }).cause;
      const unsent = cause?.code === "ECONNREFUSED" || cause?.code === "ENOTFOUND";
      throw new TransportError(`cannot reach the runner at ${this.url}: ${error}`, !unsent);
    }
  }
}

function sessionPath(id: string): string {
  return `/v1/sessions/${encodeURIComponent(id)}`;
}

function filePath(id: string, name: string): string {
  return `${sessionPath(id)}/files/${safeParts(name).map(encodeURIComponent).join("/")}`;
}

/** A run's output as it comes (`for await`), then its record (`await stream.result()`). */
export class RunStream<T> implements AsyncIterable<Output> {
  private outputs: AsyncGenerator<Output> | null = null;
  private record: T | null = null;

  constructor(private readonly client: Client, private readonly call: Call) {}

  [Symbol.asyncIterator](): AsyncGenerator<Output> {
    this.outputs ??= this.read();
    return this.outputs;
  }

  /** The run's record; awaiting it reads (and drops) any output not read yet. */
  async result(): Promise<T> {
    for await (const _ of this) {
      // drained
    }
    if (this.record === null) throw new StockadeError("the stream was closed before its result");
    return this.record;
  }

  /** Stop reading (the run goes on to its end within its limits). */
  async close(): Promise<void> {
    await this.outputs?.return(undefined);
  }

  private async *read(): AsyncGenerator<Output> {
    const response = await this.client.open(this.call);
    if (!(response.headers.get("content-type") ?? "").startsWith(STREAM_TYPE)) {
      this.record = decode<T>(await readCapped(response), this.call);
      return;
    }
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let total = 0;
    let name = "message";
    let data: string[] = [];
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        total += value.length;
        if (total > MAX_ANSWER) throw new AnswerError("the runner's stream is over the client's cap");
        buffer += value;
        let newline: number;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, "");
          buffer = buffer.slice(newline + 1);
          if (line) {
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") name = value;
            else if (field === "data") data.push(value);
            continue;
          }
          const event = name;
          const payload = data.join("\n");
          name = "message";
          data = [];
          if ((event === "stdout" || event === "stderr") && payload) {
            yield { stream: event, text: JSON.parse(payload) as string };
          } else if (event === "result") {
            this.record = JSON.parse(payload) as T;
          }
        }
      }
    } catch (error) {
      if (error instanceof StockadeError) throw error;
      throw new TransportError(`the runner's stream broke: ${error}`, true);
    } finally {
      await reader.cancel().catch(() => undefined);
    }
    if (this.record === null) throw new AnswerError("the runner's stream ended without a result");
  }
}

/** A session: an interpreter in a confined process that keeps its state across calls. */
export class Session {
  readonly id: string;

  constructor(private readonly client: Client, public info: SessionInfo) {
    this.id = info.id;
  }

  /** Run a cell: its record, with what it showed in `outputs`. */
  run(code: string, stdin = ""): Promise<CellResult> {
    return this.client.call<CellResult>(json("POST", `${sessionPath(this.id)}/runs`,
                                              { code, stdin }));
  }

  stream(code: string, stdin = ""): RunStream<CellResult> {
    return new RunStream<CellResult>(this.client, json(
      "POST", `${sessionPath(this.id)}/runs`, { code, stdin }, { stream: true }));
  }

  async files(): Promise<FileEntry[]> {
    return (await this.client.call<{ files: FileEntry[] }>(
      { method: "GET", path: `${sessionPath(this.id)}/files` })).files;
  }

  async upload(name: string, content: string | Uint8Array): Promise<void> {
    const body = typeof content === "string" ? new TextEncoder().encode(content) : content;
    await this.client.call({ method: "PUT", path: filePath(this.id, name), body,
                             contentType: "application/octet-stream" });
  }

  download(name: string): Promise<Uint8Array> {
    return this.client.call<Uint8Array>({ method: "GET", path: filePath(this.id, name) }, true);
  }

  async remove(name: string): Promise<void> {
    await this.client.call({ method: "DELETE", path: filePath(this.id, name) });
  }

  /** The session's state and usage now. */
  async refresh(): Promise<SessionInfo> {
    this.info = await this.client.call<SessionInfo>({ method: "GET", path: sessionPath(this.id) });
    return this.info;
  }

  /** End the session; one that has ended already is left as it is. */
  async end(): Promise<void> {
    try {
      await this.client.call({ method: "DELETE", path: sessionPath(this.id) });
    } catch (error) {
      if (!(error instanceof ApiError && (error.status === 404 || error.status === 410))) {
        throw error;
      }
    }
  }
}
