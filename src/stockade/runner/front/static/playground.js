// The playground: one page over the runner's own API (POST /v1/runs, the /v1/sessions
// routes, GET /v1/languages, GET /v1/environments, GET /openapi.json). Program output is only ever text
// (textContent); files a run leaves in out/ are downloads, and only PNG/JPEG/GIF images and
// HTML are shown (a session's values too), the HTML in a sandboxed frame with no scripts. The API key, where one is needed, lives in this tab's
// sessionStorage only.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "stockade.api-key";
  const state = { anonymous: true, limits: null, files: [], urls: [], escaped: false,
                  session: null, cells: 0, shownUrls: [] };

  // -- the editor: a textarea over a highlighted copy of its text -------------------------

  const KEYWORDS = new Set(("False None True and as assert async await break class continue " +
    "def del elif else except finally for from global if import in is lambda nonlocal not " +
    "or pass raise return try while with yield match case").split(" "));
  const BUILTINS = new Set(("print len range open input int str float list dict set tuple " +
    "bool bytes type isinstance enumerate zip map filter sorted reversed sum min max abs " +
    "round repr any all iter next super object Exception ValueError TypeError KeyError " +
    "IndexError RuntimeError").split(" "));
  const TOKEN = new RegExp([
    String.raw`(#[^\n]*)`,                                                   // 1 comment
    String.raw`((?:[rRbBuUfF]{1,2})?(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|` +
      String.raw`"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?))`,               // 2 string
    String.raw`(@[A-Za-z_][\w.]*)`,                                          // 3 decorator
    String.raw`(\b0[xXoObB][\da-fA-F_]+\b|\b\d[\d_]*(?:\.\d[\d_]*)?(?:[eE][+-]?\d+)?j?\b)`, // 4
    String.raw`([A-Za-z_]\w*)`,                                              // 5 name
  ].join("|"), "g");

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function span(kind, text) {
    return `<span class="tok-${kind}">${escapeHtml(text)}</span>`;
  }

  function highlight(source) {
    let html = "";
    let last = 0;
    let afterDef = false;
    for (const match of source.matchAll(TOKEN)) {
      html += escapeHtml(source.slice(last, match.index));
      const [text, comment, string, decorator, number, name] = match;
      if (comment) html += span("com", text);
      else if (string) html += span("str", text);
      else if (decorator) html += span("dec", text);
      else if (number) html += span("num", text);
      else if (afterDef) html += span("fn", text);
      else if (KEYWORDS.has(name)) html += span("kw", text);
      else if (BUILTINS.has(name)) html += span("bi", text);
      else html += escapeHtml(text);
      afterDef = name === "def" || name === "class";
      last = match.index + text.length;
    }
    html += escapeHtml(source.slice(last));
    return html + "\n";  // the last line shows even when empty
  }

  function redraw() {
    $("highlight").innerHTML = highlight($("code").value);
    syncScroll();
  }

  function syncScroll() {
    const pre = $("highlight").parentElement;
    pre.scrollTop = $("code").scrollTop;
    pre.scrollLeft = $("code").scrollLeft;
  }

  function editorKey(event) {
    if (event.key === "Escape") {
      state.escaped = true;  // the next Tab leaves the editor
      return;
    }
    if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.altKey &&
        !state.escaped) {
      event.preventDefault();
      const area = $("code");
      area.setRangeText("    ", area.selectionStart, area.selectionEnd, "end");
      redraw();
    }
    state.escaped = false;
  }

  // -- what the runner offers: limits and whether it needs a key --------------------------

  const UNITS = { _s: "s", _mib: "MiB", _kib: "KiB" };

  function unitOf(name) {
    const suffix = Object.keys(UNITS).find((s) => name.endsWith(s));
    return suffix ? ` ${UNITS[suffix]}` : "";
  }

  async function loadLanguages() {
    const answer = await fetch("/v1/languages");
    if (!answer.ok) return;
    const info = await answer.json();
    state.limits = info.limits;
    const box = document.createElement("div");
    box.className = "limits";
    for (const [name, fallback] of Object.entries(info.limits.default)) {
      const cap = info.limits.maximum[name];
      const label = document.createElement("label");
      label.htmlFor = `limit-${name}`;
      label.textContent = `${name} (default ${fallback}, at most ${cap}${unitOf(name)})`;
      const input = document.createElement("input");
      Object.assign(input, { id: `limit-${name}`, type: "number", min: "0", max: String(cap),
                             step: "any", placeholder: String(fallback) });
      input.dataset.limit = name;
      box.append(label, input);
    }
    $("limits").append(box);
  }

  // Each environment the runner serves; a run goes to the one chosen, sessions (which run
  // in the default one) keep the choice on the default while they last.
  async function loadEnvironments() {
    const answer = await fetch("/v1/environments");
    if (!answer.ok) return;
    const listing = await answer.json();
    for (const env of listing.environments) {
      const option = document.createElement("option");
      option.value = env.name;
      const extra = env.packages.filter((p) => p.name !== "msgspec").length;
      option.textContent = `Python ${env.version}` + (extra ? `, ${extra} packages` : ", standard library")
        + (env.default ? " (default)" : "");
      option.title = env.description;
      option.selected = env.default;
      $("environment").append(option);
    }
    state.defaultEnvironment = listing.default;
  }

  function keepChanged() {
    if ($("keep").checked && state.defaultEnvironment) {
      $("environment").value = state.defaultEnvironment;
    }
    $("environment").disabled = $("keep").checked;
    if (!$("keep").checked) endSession();
  }

  async function loadSecurity() {
    const answer = await fetch("/openapi.json");
    if (!answer.ok) return;
    const security = (await answer.json()).paths["/v1/runs"].post.security || [{}];
    state.anonymous = security.some((scheme) => Object.keys(scheme).length === 0);
    showKeyBox(!state.anonymous || Boolean(sessionStorage.getItem(KEY_STORE)));
  }

  function showKeyBox(visible) {
    $("key-box").hidden = !visible;
    $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  }

  // -- files in -----------------------------------------------------------------------------

  function toBase64(bytes) {
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }

  function fromBase64(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }

  async function readFiles() {
    const chosen = Array.from($("files").files);
    state.files = await Promise.all(chosen.map(async (file) => ({
      name: file.name, encoding: "base64",
      content: toBase64(new Uint8Array(await file.arrayBuffer())),
    })));
    $("file-list").replaceChildren(...chosen.map((file) => {
      const item = document.createElement("li");
      item.textContent = `${file.name} (${file.size} bytes)`;
      return item;
    }));
  }

  // -- a run ----------------------------------------------------------------------------------

  function limitsAsked() {
    const limits = {};
    for (const input of document.querySelectorAll("[data-limit]")) {
      if (input.value.trim() !== "") limits[input.dataset.limit] = Number(input.value);
    }
    return limits;
  }

  function request() {
    const args = $("args").value === "" ? [] : $("args").value.replace(/\n$/, "").split("\n");
    return { code: $("code").value, environment: $("environment").value || null,
             stdin: $("stdin").value, args, files: state.files, limits: limitsAsked() };
  }

  function headers(accept) {
    const sent = { "Content-Type": "application/json", Accept: accept };
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) sent.Authorization = `Bearer ${key}`;
    return sent;
  }

  // A session is started by the first run with "Keep state", with the limits asked then;
  // later runs are its cells. It ends with "End session", or when the runner says it has.
  async function sessionUrl() {
    if (!state.session) {
      const answer = await fetch("/v1/sessions", {
        method: "POST", headers: headers("application/json"),
        body: JSON.stringify({ limits: limitsAsked() }),
      });
      const body = await answer.json().catch(() => null);
      if (answer.status !== 201 || !body) {
        showApiError(answer, body);
        return null;
      }
      state.session = body.id;
      state.cells = 0;
    }
    return `/v1/sessions/${state.session}/runs`;
  }

  function showSession(note) {
    $("session-box").hidden = !state.session && !note;
    $("end-session").hidden = !state.session;
    $("session-info").textContent = note || (state.session
      ? `session ${state.session.split(".").pop().slice(0, 8)}…, ${state.cells} cells run`
      : "");
  }

  function dropSession(note) {
    state.session = null;
    showSession(note);
  }

  async function endSession() {
    const id = state.session;
    if (!id) return;
    dropSession("session ended");
    await fetch(`/v1/sessions/${id}`, { method: "DELETE", headers: headers("application/json") })
      .catch(() => null);
  }

  async function run() {
    if ($("run").disabled) return;
    $("placeholder").hidden = true;
    $("run").disabled = true;
    $("busy").hidden = false;
    $("api-error").hidden = true;
    try {
      const url = $("keep").checked ? await sessionUrl() : "/v1/runs";
      if (!url) return;
      const body = url === "/v1/runs" ? request()
        : { code: $("code").value, stdin: $("stdin").value };
      // The output streams in as the program writes it; the record comes last.
      const answer = await fetch(url, {
        method: "POST", headers: headers("text/event-stream"), body: JSON.stringify(body),
      });
      const type = answer.headers.get("Content-Type") || "";
      if (answer.ok && type.startsWith("text/event-stream")) {
        await showStream(answer);
      } else {
        const record = await answer.json().catch(() => null);
        if (answer.ok && record) showResult(record);
        else showApiError(answer, record);
      }
    } catch (error) {
      showApiError(null, { error: { code: "unreachable", message:
        `cannot reach the runner: ${error.message}` } });
    } finally {
      $("run").disabled = false;
      $("busy").hidden = true;
    }
  }

  // Server-sent events from a POST (EventSource only GETs): blocks split at blank lines,
  // each an `event:` name and `data:` lines; every event's data is JSON.
  async function* events(answer) {
    const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") name = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) yield [name, JSON.parse(data.join("\n"))];
      }
    }
  }

  async function showStream(answer) {
    $("result").hidden = false;
    $("status").textContent = "running";
    $("status").className = "badge running";
    for (const id of ["facts", "message", "stdout", "stderr"]) $(id).textContent = "";
    for (const id of ["stdout-truncated", "stderr-truncated", "out", "outputs"]) {
      $(id).hidden = true;
    }
    for await (const [name, data] of events(answer)) {
      if (name === "stdout" || name === "stderr") $(name).append(data);
      else if (name === "result") return showResult(data);
    }
    showApiError(answer, { error: { code: "stream_ended",
      message: "the runner's stream ended before the result; run it again" } });
  }

  function showApiError(answer, body) {
    const error = (body && body.error) || { code: "http_error",
      message: `the runner answered HTTP ${answer ? answer.status : "?"}` };
    const box = $("api-error");
    const code = document.createElement("code");
    code.textContent = error.code;
    const words = [`: ${error.message}`];
    if (error.field) words.push(` (field ${error.field})`);
    if (answer && answer.headers.get("Retry-After")) {
      words.push(`; retry after ${answer.headers.get("Retry-After")} s`);
    }
    if (error.request_id) words.push(`. Request id ${error.request_id}.`);
    box.replaceChildren(code, document.createTextNode(words.join("")));
    box.hidden = false;
    if (answer && answer.status === 401) {
      showKeyBox(true);
      $("key").focus();
    }
    if (answer && state.session && (answer.status === 404 || answer.status === 410)) {
      dropSession("the session is gone: the next run starts another");
    }
  }

  function facts(result) {
    const parts = [];
    if (result.exit_code !== null) parts.push(`exit ${result.exit_code}`);
    if (result.signal) parts.push(result.signal);
    parts.push(`cpu ${result.cpu_time_s.toFixed(3)} s`, `wall ${result.wall_time_s.toFixed(3)} s`,
               `memory ${(result.memory_peak_kib / 1024).toFixed(1)} MiB`);
    return parts.join(" · ");
  }

  function showResult(result) {
    $("result").hidden = false;
    $("status").textContent = result.status;
    $("status").className = `badge ${result.status}`;
    $("facts").textContent = facts(result);
    $("message").textContent = result.message || "";
    $("stdout").textContent = result.stdout;
    $("stderr").textContent = result.stderr;
    $("stdout-truncated").hidden = !result.stdout_truncated;
    $("stderr-truncated").hidden = !result.stderr_truncated;
    showFiles(result.files || [], Boolean(result.files_truncated));
    showOutputs(result.outputs || [], Boolean(result.outputs_truncated));
    if (state.session) {
      state.cells += 1;
      if (result.session_ended) dropSession(`the session ended: ${result.message}`);
      else showSession();
    }
  }

  // A session's values: text as text, HTML in a sandboxed frame, PNG as an image.
  function showOutputs(outputs, truncated) {
    state.shownUrls.forEach((url) => URL.revokeObjectURL(url));
    state.shownUrls = [];
    $("outputs").hidden = outputs.length === 0 && !truncated;
    $("outputs-truncated").hidden = !truncated;
    $("shown").replaceChildren(...outputs.map((output) => {
      if (output.mime === "image/png") {
        const url = URL.createObjectURL(new Blob([fromBase64(output.data)],
                                                 { type: "image/png" }));
        state.shownUrls.push(url);
        const image = document.createElement("img");
        Object.assign(image, { src: url, alt: "a figure the cell drew" });
        return image;
      }
      if (output.mime === "text/html") {
        const frame = document.createElement("iframe");
        frame.setAttribute("sandbox", "");  // no scripts, no forms, an origin of its own
        frame.title = "a table the cell showed";
        frame.srcdoc = output.data;
        return frame;
      }
      const text = document.createElement("pre");
      text.textContent = output.data;
      return text;
    }));
  }

  const IMAGES = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif" };

  function showFiles(files, truncated) {
    state.urls.forEach((url) => URL.revokeObjectURL(url));
    state.urls = [];
    $("out").hidden = files.length === 0 && !truncated;
    $("files-truncated").hidden = !truncated;
    const items = [];
    const renders = [];
    for (const file of files) {
      const bytes = file.encoding === "base64" ? fromBase64(file.content)
        : new TextEncoder().encode(file.content);
      const extension = file.name.split(".").pop().toLowerCase();
      const type = IMAGES[extension] || "application/octet-stream";
      const url = URL.createObjectURL(new Blob([bytes], { type }));
      state.urls.push(url);
      const item = document.createElement("li");
      const link = document.createElement("a");
      Object.assign(link, { href: url, download: file.name.split("/").pop() });
      link.textContent = file.name;
      item.append(link, document.createTextNode(` (${bytes.length} bytes)`));
      items.push(item);
      const shown = render(file.name, extension, url, bytes);
      if (shown) renders.push(shown);
    }
    $("out-files").replaceChildren(...items);
    $("renders").replaceChildren(...renders);
  }

  function render(name, extension, url, bytes) {
    let view;
    if (extension in IMAGES) {
      view = document.createElement("img");
      Object.assign(view, { src: url, alt: name });
    } else if (extension === "html" || extension === "htm") {
      view = document.createElement("iframe");
      view.setAttribute("sandbox", "");  // no scripts, no forms, an origin of its own
      view.title = name;
      view.srcdoc = new TextDecoder().decode(bytes);
    } else {
      return null;
    }
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = name;
    figure.append(view, caption);
    return figure;
  }

  // -- wiring -----------------------------------------------------------------------------------

  function start() {
    $("code").addEventListener("input", redraw);
    $("code").addEventListener("scroll", syncScroll);
    $("code").addEventListener("keydown", editorKey);
    $("files").addEventListener("change", readFiles);
    $("run").addEventListener("click", run);
    $("end-session").addEventListener("click", endSession);
    $("keep").addEventListener("change", keepChanged);
    window.addEventListener("pagehide", () => {  // a tab closed ends its session at once
      if (state.session) {
        fetch(`/v1/sessions/${state.session}`, { method: "DELETE", keepalive: true,
                                                 headers: headers("application/json") });
      }
    });
    $("key").addEventListener("input", () => {
      const key = $("key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      $("key").value = "";
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        run();
      }
    });
    redraw();
    loadLanguages();
    loadEnvironments();
    loadSecurity();
  }

  start();
})();
