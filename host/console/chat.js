// The chat view: a session's history, then the live run as its events
// arrive. A run is followed through `GET /sessions/{id}/runs/{run}/events`;
// what was shown of it and the last event id are kept in sessionStorage,
// so after a reload the page shows the same and asks only for what came
// after (`Last-Event-ID`).

import { api, stream, ApiError } from "./api.js";
import { events } from "./sse.js";
import { render } from "./markdown.js";
import { h, $, clear, short } from "./dom.js";

const LIVE_KEY = "hangar.live";
const ACTIVE = new Set(["queued", "running", "waiting"]);
// Output longer than this starts collapsed.
const LONG_LINES = 12;
const LONG_CHARS = 800;

let ui = { report: () => {} };
let current = null; // { session, live, abort }

export function init(options) {
  ui = options;
  $("#stop").addEventListener("click", stop);
  watchScroll();
}

function loadLive() {
  try {
    return JSON.parse(sessionStorage.getItem(LIVE_KEY) || "null");
  } catch {
    return null;
  }
}

function saveLive(live) {
  if (live && !live.ended) sessionStorage.setItem(LIVE_KEY, JSON.stringify(live));
  else sessionStorage.removeItem(LIVE_KEY);
}

export function currentSession() {
  return current && current.session;
}

/** Shows session `id`: its history, then its active run, if any, live. */
export async function open(id) {
  leave();
  current = { session: id, live: null, abort: new AbortController() };
  const mine = current;
  const transcript = clear($("#transcript"));
  setRunning(false);
  const [session, runs] = await Promise.all([api("GET", `/sessions/${id}`), api("GET", `/sessions/${id}/runs?limit=1`)]);
  if (current !== mine) return;
  $("#chat-session-info").textContent = `${session.work_dir || "no working directory"} · ${short(session.id)}`;
  const history = session.history || [];
  let live = loadLive();
  if (live && live.session !== id) live = null;
  const latest = runs[0];
  if (!live && latest && ACTIVE.has(latest.status)) {
    // A run started elsewhere (another tab, another client): shown from its first event.
    live = { session: id, run: latest.id, user: null, items: [], last: 0, ended: false, queued: latest.status === "queued" };
  }
  const base = live ? baseOf(history, live) : history.length;
  for (const item of fromHistory(history.slice(0, base))) transcript.append(node(item));
  if (live) {
    if (base < history.length && live.user === null) live.user = userText(history[base]);
    current.live = live;
    if (live.user !== null) transcript.append(node({ kind: "user", text: live.user }));
    transcript.append(...live.items.map(node));
    follow(mine, live);
  }
  scrollDown(true);
}

/** Where the live run's part of the history starts: its user message. */
function baseOf(history, live) {
  for (let i = history.length - 1; i >= 0; i--) {
    const text = userText(history[i]);
    if (text === null) continue;
    if (live.user === null ? !live.queued : text === live.user) return i;
    if (live.user === null) break;
  }
  return history.length;
}

function userText(message) {
  if (!message || message.role !== "user") return null;
  const texts = message.content.filter((b) => b.type === "text").map((b) => b.text);
  return texts.length ? texts.join("\n") : null;
}

/** History messages as transcript items (tool results joined to their calls). */
function fromHistory(history) {
  const items = [];
  const tools = new Map();
  for (const message of history) {
    for (const block of message.content) {
      if (block.type === "text") {
        items.push(message.role === "user" ? { kind: "user", text: block.text } : { kind: "text", text: block.text });
      } else if (block.type === "tool_use") {
        const tool = { kind: "tool", id: block.id, name: block.name, input: block.input, output: null, is_error: false };
        tools.set(block.id, tool);
        items.push(tool);
      } else if (block.type === "tool_result") {
        const tool = tools.get(block.tool_use_id);
        if (tool) Object.assign(tool, { output: block.content, is_error: block.is_error });
      }
    }
  }
  return items;
}

export async function send(agentId, text) {
  const id = current && current.session;
  if (!id) throw new Error("Open or create a session first.");
  if (current.live && !current.live.ended) throw new Error("A run is still going; stop it or wait for it to end.");
  const mine = current;
  const accepted = await api("POST", `/sessions/${id}/message`, { agent_id: agentId, message: text, background: true });
  if (current !== mine) return;
  const live = { session: id, run: accepted.run_id, user: text, items: [], last: 0, ended: false };
  const transcript = $("#transcript");
  transcript.append(node({ kind: "user", text }));
  current.live = live;
  saveLive(live);
  follow(mine, live);
  scrollDown(true);
}

async function stop() {
  const live = current && current.live;
  if (!live || live.ended) return;
  $("#stop").disabled = true;
  try {
    await api("POST", `/sessions/${live.session}/runs/${live.run}/cancel`);
  } catch (err) {
    ui.report(err);
    $("#stop").disabled = false;
  }
}

function leave() {
  if (current) current.abort.abort();
  current = null;
}

function setRunning(running, text = "") {
  $("#stop").disabled = !running;
  $("#send").disabled = running;
  const status = $("#run-status");
  status.textContent = text;
  status.dataset.state = running ? "running" : "idle";
  // Screen readers hear the answer once it is whole, not every delta.
  $("#transcript").setAttribute("aria-busy", String(running));
}

async function follow(mine, live) {
  setRunning(true, live.queued ? "Queued…" : "Running…");
  $("#transcript").dataset.run = live.run;
  let failures = 0;
  while (!live.ended && current === mine) {
    try {
      const resp = await stream(`/sessions/${live.session}/runs/${live.run}/events`, {
        signal: mine.abort.signal,
        lastEventId: live.last,
      });
      for await (const ev of events(resp)) {
        if (current !== mine) return;
        apply(live, ev);
        if (ev.id) live.last = Number(ev.id);
        $("#transcript").dataset.lastEventId = String(live.last);
        saveLive(live);
        failures = 0;
      }
    } catch (err) {
      if (mine.abort.signal.aborted || current !== mine) return;
      console.warn("following the run failed", err);
      if (err instanceof ApiError && err.status < 500) {
        ui.report(err);
        live.ended = true;
        saveLive(live);
        break;
      }
      failures++;
      if (failures === 3) ui.report(new Error(`Lost the run's events (${err.message}); still trying.`));
      setRunning(true, `Connection lost, resuming (${failures})…`);
    }
    if (!live.ended && current === mine) await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** failures, 5000)));
  }
  if (current === mine) {
    setRunning(false, live.status || "");
  }
}

/** One event of the live run: the transcript item it changes, redrawn. */
function apply(live, ev) {
  let data;
  try {
    data = JSON.parse(ev.data);
  } catch {
    return;
  }
  const last = live.items[live.items.length - 1];
  const transcript = $("#transcript");
  const add = (item) => {
    live.items.push(item);
    transcript.append(node(item));
  };
  switch (ev.event) {
    case "text":
      if (last && last.kind === "text") {
        last.text += data.content;
        redraw(last);
      } else {
        add({ kind: "text", text: data.content });
      }
      setRunning(true, "Running…");
      break;
    case "tool_use":
      add({ kind: "tool", id: data.id, name: data.name, input: data.input, output: null, is_error: false });
      break;
    case "tool_result": {
      const tool = live.items.find((i) => i.kind === "tool" && i.id === data.tool_use_id);
      if (tool) {
        Object.assign(tool, { output: data.content, is_error: data.is_error });
        redraw(tool);
      }
      break;
    }
    case "permission_request": {
      const perm = { kind: "perm", session: live.session, request_id: data.request_id, tool: data.tool, input: data.input, patterns: data.patterns || [], status: null };
      // Asked about a call shown above: the question goes with it.
      const tool = live.items.find((i) => i.kind === "tool" && i.id === data.tool_use_id);
      if (tool) {
        perm.inTool = true;
        tool.perm = perm;
        redraw(tool);
      } else {
        add(perm);
      }
      setRunning(true, "Waiting for your answer…");
      break;
    }
    case "permission_replied": {
      const perm = live.items.map((i) => (i.kind === "tool" ? i.perm : i)).find((i) => i && i.kind === "perm" && i.request_id === data.request_id);
      if (perm) {
        Object.assign(perm, { status: data.status, reply: data.reply, message: data.message });
        redraw(perm);
      }
      setRunning(true, "Running…");
      break;
    }
    case "done": {
      const reason = data.stop_reason === "cancelled" ? "cancelled" : "completed";
      live.status = `Run ${reason}`;
      add({ kind: "end", state: reason, text: `Run ${reason} · ${data.steps} step${data.steps === 1 ? "" : "s"} · ${data.usage.input_tokens} in / ${data.usage.output_tokens} out tokens` });
      live.ended = true;
      break;
    }
    case "error":
      live.status = "Run failed";
      add({ kind: "end", state: "failed", text: `Run failed (${data.code}): ${data.error}` });
      live.ended = true;
      break;
    case "resync_required":
      live.ended = true;
      ui.report(new Error(`${data.error} — showing the stored history instead.`));
      saveLive(null);
      setTimeout(() => open(live.session).catch(ui.report), 0);
      break;
    default:
      break;
  }
  scrollDown();
}

const nodes = new WeakMap();

function redraw(item) {
  const old = nodes.get(item);
  if (old && old.isConnected) old.replaceWith(node(item));
}

/** The DOM of one transcript item. Every string goes in as text. */
function node(item) {
  let el;
  switch (item.kind) {
    case "user":
      el = h("div", { class: "msg user" }, h("div", { class: "who" }, "You"), h("div", { class: "plain-text" }, item.text));
      break;
    case "text":
      el = h("div", { class: "msg assistant" }, h("div", { class: "who" }, "Agent"), h("div", { class: "md" }, render(item.text)));
      break;
    case "tool":
      el = toolNode(item);
      break;
    case "perm":
      el = permNode(item);
      break;
    case "end":
      el = h("p", { class: `run-end ${item.state}`, dataset: { state: item.state } }, item.text);
      break;
    default:
      el = h("div");
  }
  nodes.set(item, el);
  return el;
}

function pretty(value) {
  if (typeof value === "string") return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function isLong(text) {
  return text.length > LONG_CHARS || text.split("\n").length > LONG_LINES;
}

function toolNode(item) {
  const state = item.output === null ? "running" : item.is_error ? "error" : "ok";
  const input = pretty(item.input);
  const summary = item.name === "bash" && item.input && typeof item.input.command === "string" ? item.input.command : "";
  const el = h(
    "div",
    { class: `tool ${state}`, dataset: { toolUseId: item.id, state } },
    h("div", { class: "tool-head" }, h("span", { class: "tool-name" }, item.name), h("code", { class: "tool-summary" }, summary), h("span", { class: "badge" }, state === "running" ? "running…" : state)),
    h("details", { class: "tool-input", open: !isLong(input) }, h("summary", {}, "Input"), h("pre", {}, input)),
  );
  if (item.perm) el.append(permNode(item.perm));
  if (item.output !== null) {
    const lines = item.output.split("\n").length;
    el.append(
      h("details", { class: "tool-output", open: !isLong(item.output) }, h("summary", {}, `Output (${lines} line${lines === 1 ? "" : "s"}, ${item.output.length} chars)`), h("pre", {}, item.output)),
    );
  }
  return el;
}

function permNode(item) {
  const inTool = !!item.inTool;
  const el = h("div", { class: `perm${inTool ? " in-tool" : ""}`, role: "group", "aria-label": `Permission request for ${item.tool}`, dataset: { requestId: item.request_id } });
  nodes.set(item, el);
  el.append(h("div", { class: "perm-head" }, h("strong", {}, "Permission needed: "), h("span", { class: "tool-name" }, item.tool)));
  // Inside its tool call the input is shown already.
  if (!inTool) el.append(h("pre", {}, pretty(item.input)));
  if (item.patterns.length) el.append(h("p", { class: "hint" }, "“Always” allows from now on in this session: ", item.patterns.join(", ")));
  if (item.status) {
    const how = item.reply ? ` (${item.reply}${item.message ? `: ${item.message}` : ""})` : "";
    el.append(h("p", { class: "perm-status", dataset: { status: item.status } }, `Answered: ${item.status}${how}`));
    return el;
  }
  const messageId = `perm-msg-${item.request_id}`;
  const message = h("input", { id: messageId, type: "text", placeholder: "Why not? (sent to the model)", autocomplete: "off" });
  const answer = async (reply, button) => {
    for (const b of el.querySelectorAll("button")) b.disabled = true;
    const body = { reply };
    if (reply === "reject" && message.value.trim()) body.message = message.value.trim();
    try {
      const answered = await api("POST", `/sessions/${item.session}/permissions/${item.request_id}`, body);
      Object.assign(item, { status: answered.status, reply: answered.reply, message: answered.message });
      redraw(item);
    } catch (err) {
      ui.report(err);
      for (const b of el.querySelectorAll("button")) b.disabled = false;
      button.focus();
    }
  };
  const once = h("button", { type: "button", class: "perm-once" }, "Allow once");
  const always = h("button", { type: "button", class: "perm-always" }, "Always allow");
  const reject = h("button", { type: "button", class: "perm-reject danger" }, "Reject");
  once.addEventListener("click", () => answer("once", once));
  always.addEventListener("click", () => answer("always", always));
  reject.addEventListener("click", () => answer("reject", reject));
  el.append(h("div", { class: "row" }, once, always, h("label", { for: messageId, class: "sr-only" }, "Reason for rejecting"), message, reject));
  return el;
}

// Follows the end of the transcript unless the reader scrolled up.
let stick = true;
let pending = false;
export function watchScroll() {
  const t = $("#transcript");
  t.addEventListener("scroll", () => {
    if (!pending) stick = t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  });
}

function scrollDown(force = false) {
  const t = $("#transcript");
  if (force) stick = true;
  if (!stick || pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    t.scrollTop = t.scrollHeight;
  });
}
