// The TypeScript client (its build in dist/) against a live runner at $STOCKADE_URL:
// runs with files in and out/ back, streams, sessions with state and files both ways,
// errors in the API's words, and the retry policy. tests/test_js_client.py runs it.
import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import {
  ApiError, Client, TransportError, fileBytes, retryAfter, retryDelay,
} from "../dist/index.js";

const url = process.env.STOCKADE_URL;
if (!url) throw new Error("STOCKADE_URL names the runner these tests call");
const runner = new Client(url);

test("a run sends files, stdin and args and brings back out/", async () => {
  const code = [
    "import os, sys",
    "data = open('in.bin', 'rb').read()",
    "os.makedirs('out', exist_ok=True)",
    "open('out/twice.bin', 'wb').write(data * 2)",
    "print(len(data), sys.argv[1], input())",
  ].join("\n");
  const result = await runner.run(code, {
    stdin: "in", args: ["arg"], files: { "in.bin": new Uint8Array([0, 255]) },
    limits: { cpu_time_s: 5 },
  });
  assert.equal(result.status, "ok", JSON.stringify(result));
  assert.equal(result.stdout, "2 arg in\n");
  const [twice] = result.files;
  assert.equal(twice.name, "twice.bin");
  assert.deepEqual([...fileBytes(twice)], [0, 255, 0, 255]);
});

test("a program's failure is a result; a refusal is an ApiError with the API's words",
  async () => {
    const spin = await runner.run("while True: pass", { limits: { cpu_time_s: 0.2 } });
    assert.equal(spin.status, "time_limit");
    await assert.rejects(runner.run("print(1)", { limits: { memory_mib: 999999 } }),
      (error) => error instanceof ApiError && error.status === 422 &&
        error.code === "limit_out_of_range" && error.field === "limits.memory_mib" &&
        typeof error.requestId === "string" && error.message.includes(error.requestId));
  });

test("a stream gives the output as it is written, then the record", async () => {
  const stream = runner.stream(
    "import sys, time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b', file=sys.stderr)");
  const outputs = [];
  for await (const output of stream) outputs.push(output);
  assert.deepEqual(outputs, [{ stream: "stdout", text: "a\n" }, { stream: "stderr", text: "b\n" }]);
  assert.equal((await stream.result()).status, "ok");
});

test("a session keeps its state and its files both ways", async () => {
  const session = await runner.session({ files: { "in.txt": "21" } });
  try {
    await session.run("x = int(open('in.txt').read())");
    const cell = await session.run("x * 2");
    assert.deepEqual(cell.outputs, [{ mime: "text/plain", data: "42", encoding: "utf8" }]);
    const streamed = session.stream("print(x, flush=True)");
    const texts = [];
    for await (const output of streamed) texts.push(output.text);
    assert.deepEqual(texts, ["21\n"]);
    await session.upload("up.bin", new Uint8Array([1, 2]));
    assert.deepEqual((await session.files()).map((f) => [f.name, f.size]).sort(),
      [["in.txt", 2], ["up.bin", 2]]);
    assert.deepEqual([...await session.download("up.bin")], [1, 2]);
    await session.remove("up.bin");
    assert.ok((await session.refresh()).calls >= 3);
    assert.throws(() => session.download("../etc/passwd"), /unsafe file name/);
  } finally {
    await session.end();
  }
  await assert.rejects(session.run("x"),
    (error) => error instanceof ApiError && error.code === "session_not_found");
  await session.end(); // ended already: nothing to do
});

test("the environments are listed", async () => {
  const listing = await runner.environments();
  assert.ok(listing.environments.some((e) => e.name === listing.default && e.default));
});

test("an unreachable runner is a TransportError after its tries", async () => {
  // A loopback port nobody listens on (fetch refuses some ports outright, 9 among them).
  const port = await new Promise((resolve) => {
    const probe = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
  const gone = new Client(`http://127.0.0.1:${port}`);
  await assert.rejects(gone.run("print(1)"),
    (error) => error instanceof TransportError && error.sent === false);
});

test("the retry policy: refusals before the start, 3 tries, 60 s", () => {
  const post = { method: "POST", path: "/v1/runs" };
  const busy = new ApiError(503, "queue_full", "busy", null, null, 20);
  assert.equal(retryDelay(post, busy, 1, 0), 20_000);
  assert.equal(retryDelay(post, busy, 3, 0), null);
  assert.equal(retryDelay(post, busy, 1, 45_000), null);
  assert.equal(retryDelay(post, new ApiError(400, "invalid_request", "no"), 1, 0), null);
  assert.equal(retryDelay(post, new ApiError(503, "http_error", "a balancer's page"), 1, 0), null);
  const lost = new TransportError("gone", true);
  assert.equal(retryDelay(post, lost, 1, 0), null);
  assert.equal(retryDelay({ ...post, idempotencyKey: "k" }, lost, 1, 0), 500);
  assert.equal(retryDelay({ method: "GET", path: "/v1/sessions" }, lost, 2, 0), 1000);
  assert.equal(retryAfter("3"), 3);
  assert.equal(retryAfter("Thu, 01 Jan 1970 00:00:00 GMT"), 0);
  assert.equal(retryAfter("soon"), null);
});
