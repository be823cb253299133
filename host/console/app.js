// The console's shell: sign-in, the views behind the hash (#/chat,
// #/agents, …), and the forms of each. Every call goes through api.js.

import { api, auth, list, probe, ApiError } from "./api.js";
import * as chat from "./chat.js";
import { h, $, $$, clear, when, short } from "./dom.js";

const VIEWS = ["signin", "chat", "agents", "sessions", "providers", "plugins", "usage"];
const AGENT_KEY = "hangar.agent";
const SESSION_KEY = "hangar.session";

const cache = { agents: [], providers: [], tools: [] };

// ---------- errors ----------

function report(err) {
  const banner = $("#banner");
  const text = err instanceof ApiError ? `${err.message}${err.code ? ` (${err.code})` : ""}` : String(err && err.message ? err.message : err);
  banner.replaceChildren(h("span", {}, text), h("button", { type: "button", class: "quiet", "aria-label": "Dismiss" }, "×"));
  banner.querySelector("button").addEventListener("click", () => (banner.hidden = true));
  banner.hidden = false;
  console.warn(err);
}

function clearReport() {
  $("#banner").hidden = true;
}

/** Runs `fn` for a form: busy while it runs, errors shown. */
function handle(form, fn) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const buttons = $$("button[type=submit]", form);
    buttons.forEach((b) => (b.disabled = true));
    clearReport();
    try {
      await fn(new FormData(form));
    } catch (err) {
      report(err);
    } finally {
      buttons.forEach((b) => (b.disabled = false));
    }
  });
}

// ---------- sign-in and routing ----------

let signedIn = false;

async function checkAccess() {
  // With no token configured the API answers without one.
  try {
    await api("GET", "/agents?limit=1");
    return true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return false;
    throw err;
  }
}

function show(view) {
  for (const name of VIEWS) $(`#view-${name}`).hidden = name !== view;
  for (const a of $$("#nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function route() {
  clearReport();
  if (!signedIn) {
    show("signin");
    $("#signin-token").focus();
    return;
  }
  const view = (location.hash.match(/^#\/(\w+)/) || [])[1] || "chat";
  const name = VIEWS.includes(view) && view !== "signin" ? view : "chat";
  show(name);
  try {
    await loaders[name]();
  } catch (err) {
    report(err);
  }
}

function setSignedIn(value) {
  signedIn = value;
  $("#nav").hidden = !value;
  $("#sign-out").hidden = !value || !auth.token;
}

auth.onUnauthorized = () => {
  if (!signedIn) return;
  auth.token = "";
  setSignedIn(false);
  route();
  report(new Error("The token or tenant key was refused; sign in again."));
};

// ---------- chat ----------

async function loadChat() {
  const [agents, sessions] = await Promise.all([list("/agents"), list("/sessions?history=false")]);
  cache.agents = agents;
  const select = clear($("#composer-agent"));
  const chosen = sessionStorage.getItem(AGENT_KEY);
  for (const a of agents) select.append(h("option", { value: a.id, selected: a.id === chosen }, a.name));
  if (!agents.length) select.append(h("option", { value: "" }, "Create an agent first"));
  renderSessionList(sessions);
  const wanted = sessionStorage.getItem(SESSION_KEY);
  if (wanted && sessions.some((s) => s.id === wanted)) {
    if (chat.currentSession() !== wanted) await chat.open(wanted);
  } else if (!chat.currentSession()) {
    clear($("#transcript")).append(h("p", { class: "hint empty" }, sessions.length ? "Pick a session, or open a new one." : "Open a session to start."));
  }
}

function renderSessionList(sessions) {
  const ul = clear($("#session-list"));
  const open = sessionStorage.getItem(SESSION_KEY);
  for (const s of [...sessions].reverse()) {
    const button = h(
      "button",
      { type: "button", class: "session-link", "aria-current": s.id === open ? "true" : null, dataset: { session: s.id } },
      h("span", {}, s.work_dir || "(no working directory)"),
      h("span", { class: "hint" }, `${short(s.id)} · ${when(s.created_at)}`),
    );
    button.addEventListener("click", () => openSession(s.id));
    ul.append(h("li", {}, button));
  }
}

async function openSession(id) {
  sessionStorage.setItem(SESSION_KEY, id);
  for (const b of $$("#session-list button")) b.setAttribute("aria-current", String(b.dataset.session === id));
  if (location.hash !== "#/chat") location.hash = "#/chat";
  try {
    await chat.open(id);
  } catch (err) {
    report(err);
  }
  $("#composer-text").focus();
}

function setupChat() {
  chat.init({ report });
  handle($("#new-session-form"), async (data) => {
    const work = String(data.get("work_dir") || "").trim();
    const session = await api("POST", "/sessions", work ? { work_dir: work } : {});
    $("#new-session-workdir").value = "";
    const sessions = await list("/sessions?history=false");
    sessionStorage.setItem(SESSION_KEY, session.id);
    renderSessionList(sessions);
    await openSession(session.id);
  });
  $("#composer-agent").addEventListener("change", (e) => sessionStorage.setItem(AGENT_KEY, e.target.value));
  handle($("#composer"), async (data) => {
    const text = String(data.get("message") || "");
    const agent = String(data.get("agent") || "");
    if (!agent) throw new Error("Pick an agent (create one under Agents).");
    sessionStorage.setItem(AGENT_KEY, agent);
    await chat.send(agent, text);
    $("#composer-text").value = "";
  });
  $("#composer-text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  });
}

// ---------- agents ----------

async function loadAgents() {
  const [agents, providers, tools] = await Promise.all([list("/agents"), api("GET", "/provider"), api("GET", "/tools")]);
  Object.assign(cache, { agents, providers, tools });
  const rows = clear($("#agent-rows"));
  for (const a of agents) {
    const edit = h("button", { type: "button", class: "quiet", "aria-label": `Edit ${a.name}` }, "Edit");
    edit.addEventListener("click", () => editAgent(a, true));
    rows.append(h("tr", { dataset: { agent: a.id } }, h("td", {}, a.name), h("td", {}, `${a.provider.id} / ${a.provider.model}`), h("td", {}, (a.tools || []).join(", ") || "—"), h("td", {}, edit)));
  }
  if (!agents.length) rows.append(h("tr", {}, h("td", { colspan: 4, class: "hint" }, "No agents yet.")));
  const select = $("#agent-provider");
  const chosen = select.value;
  clear(select);
  for (const p of providers) select.append(h("option", { value: p.id, selected: p.id === chosen }, p.name || p.id));
  const form = $("#agent-form");
  if (!form.dataset.ready) {
    form.dataset.ready = "1";
    editAgent(null);
  } else {
    renderTools(selectedTools());
  }
  await loadModels();
}

function selectedTools() {
  return $$("#agent-tools input:checked").map((i) => i.value);
}

function renderTools(checked) {
  const box = clear($("#agent-tools"));
  for (const t of cache.tools) {
    const id = `tool-${t.name}`;
    box.append(h("label", { for: id, title: t.description }, h("input", { id, type: "checkbox", name: "tools", value: t.name, checked: checked.includes(t.name) }), " ", t.name));
  }
}

async function loadModels() {
  const provider = $("#agent-provider").value;
  const datalist = clear($("#agent-models"));
  if (!provider) return;
  try {
    const models = await api("GET", `/provider/${encodeURIComponent(provider)}/models`);
    for (const m of models) datalist.append(h("option", { value: m.id }, m.name || m.id));
    $("#agent-model").dataset.modelsFor = provider;
  } catch (err) {
    // The model can still be typed in.
    report(err);
  }
}

function editAgent(agent, focus = false) {
  $("#agent-form-title").textContent = agent ? `Edit ${agent.name}` : "New agent";
  $("#agent-save").textContent = agent ? "Save agent" : "Create agent";
  $("#agent-delete").hidden = !agent;
  $("#agent-id").value = agent ? agent.id : "";
  $("#agent-name").value = agent ? agent.name : "";
  $("#agent-instructions").value = agent ? agent.instructions || "" : "";
  if (agent) $("#agent-provider").value = agent.provider.id;
  $("#agent-model").value = agent ? agent.provider.model : "";
  $("#agent-max-tokens").value = agent && agent.provider.max_tokens ? agent.provider.max_tokens : "";
  $("#agent-permissions").value = JSON.stringify(agent ? agent.permissions || [] : [], null, 1);
  renderTools(agent ? agent.tools || [] : []);
  if (agent) loadModels();
  if (focus) $("#agent-name").focus();
}

function setupAgents() {
  $("#agent-new").addEventListener("click", () => {
    editAgent(null, true);
  });
  $("#agent-provider").addEventListener("change", loadModels);
  handle($("#agent-form"), async (data) => {
    let permissions;
    try {
      permissions = JSON.parse(String(data.get("permissions") || "[]"));
    } catch (err) {
      throw new Error(`Permission rules are not valid JSON: ${err.message}`);
    }
    const provider = { id: String(data.get("provider")), model: String(data.get("model")).trim() };
    const maxTokens = String(data.get("max_tokens") || "").trim();
    if (maxTokens) provider.max_tokens = Number(maxTokens);
    const body = {
      name: String(data.get("name")).trim(),
      instructions: String(data.get("instructions") || ""),
      tools: selectedTools(),
      provider,
      permissions,
    };
    const id = String(data.get("id") || "");
    const saved = id ? await api("PUT", `/agents/${id}`, body) : await api("POST", "/agents", body);
    sessionStorage.setItem(AGENT_KEY, saved.id);
    await loadAgents();
    editAgent(saved);
    flash(`Saved agent “${saved.name}”.`);
  });
  $("#agent-delete").addEventListener("click", async () => {
    const id = $("#agent-id").value;
    if (!id || !confirm("Delete this agent?")) return;
    try {
      await api("DELETE", `/agents/${id}`);
      editAgent(null);
      await loadAgents();
    } catch (err) {
      report(err);
    }
  });
}

// ---------- sessions and runs ----------

async function loadSessions() {
  const sessions = await list("/sessions?history=false");
  const rows = clear($("#session-rows"));
  for (const s of [...sessions].reverse()) {
    const runs = h("button", { type: "button", class: "quiet" }, "Runs");
    runs.addEventListener("click", () => loadRuns(s.id));
    const open = h("button", { type: "button", class: "quiet" }, "Open");
    open.addEventListener("click", () => openSession(s.id));
    const remove = h("button", { type: "button", class: "quiet danger", "aria-label": `Delete session ${short(s.id)}` }, "Delete");
    remove.addEventListener("click", async () => {
      if (!confirm("Delete this session and its history?")) return;
      try {
        await api("DELETE", `/sessions/${s.id}`);
        await loadSessions();
      } catch (err) {
        report(err);
      }
    });
    rows.append(h("tr", { dataset: { session: s.id } }, h("td", {}, h("code", {}, s.id)), h("td", {}, s.work_dir || "—"), h("td", {}, when(s.created_at)), h("td", {}, h("div", { class: "actions" }, open, runs, remove))));
  }
  if (!sessions.length) rows.append(h("tr", {}, h("td", { colspan: 4, class: "hint" }, "No sessions yet.")));
  const chosen = sessionStorage.getItem(SESSION_KEY);
  if (chosen && sessions.some((s) => s.id === chosen)) await loadRuns(chosen);
}

async function loadRuns(id) {
  $("#runs-title").textContent = `Runs of ${short(id)}`;
  const runs = await api("GET", `/sessions/${id}/runs?limit=50`);
  const rows = clear($("#run-rows"));
  for (const r of runs) {
    const usage = r.usage ? `${r.usage.input_tokens} / ${r.usage.output_tokens}` : "—";
    rows.append(h("tr", { dataset: { run: r.id, status: r.status } }, h("td", {}, h("code", { class: "id", title: r.id }, short(r.id))), h("td", {}, h("span", { class: `badge ${r.status}` }, r.status)), h("td", {}, r.steps ?? "—"), h("td", {}, usage), h("td", {}, when(r.started_at || r.created_at))));
  }
  if (!runs.length) rows.append(h("tr", {}, h("td", { colspan: 5, class: "hint" }, "No runs yet.")));
}

// ---------- providers ----------

async function loadProviders() {
  const [providers, authState] = await Promise.all([api("GET", "/provider"), api("GET", "/provider/auth")]);
  const box = clear($("#provider-cards"));
  for (const p of providers) {
    const state = (authState.providers || {})[p.id] || {};
    const form = h("form", { class: "card stack", "aria-label": `${p.name || p.id} credentials`, dataset: { provider: p.id } });
    const keyId = `key-${p.id}`;
    const urlId = `url-${p.id}`;
    const needsKey = p.auth_types.length > 0;
    const badge = !needsKey ? h("span", { class: "badge" }, "no key needed") : h("span", { class: `badge ${state.configured ? "ok" : ""}` }, state.configured ? "key set" : "no key");
    form.append(h("h2", {}, p.name || p.id, " ", badge, state.source ? h("span", { class: "hint" }, ` ${state.source}`) : null));
    if (state.error) form.append(h("p", { class: "error-text" }, state.error));
    if (p.auth_types.length) {
      form.append(h("label", { for: keyId }, `API key (${p.auth_types.join(", ")})`), h("input", { id: keyId, name: "key", type: "password", autocomplete: "off", placeholder: state.configured ? "•••••• (set; type to replace)" : "" }));
    }
    form.append(h("label", { for: urlId }, "Base URL ", h("span", { class: "hint" }, "(optional)")), h("input", { id: urlId, name: "base_url", type: "url", autocomplete: "off", value: state.base_url || "" }));
    // Removes what is stored: the key and the base URL.
    const stored = (needsKey && state.configured && state.source === "stored") || !!state.base_url;
    const remove = h("button", { type: "button", class: "danger", hidden: !stored }, needsKey ? "Remove key" : "Reset");
    remove.addEventListener("click", async () => {
      try {
        await api("DELETE", `/provider/auth/${encodeURIComponent(p.id)}`);
        await loadProviders();
        flash(`Removed the key of ${p.name || p.id}.`);
      } catch (err) {
        report(err);
      }
    });
    form.append(h("div", { class: "row" }, h("button", { type: "submit" }, "Save"), remove));
    handle(form, async (data) => {
      const entry = {};
      const key = String(data.get("key") || "");
      const baseUrl = String(data.get("base_url") || "").trim();
      if (key) {
        entry.type = p.auth_types[0];
        entry.key = key;
      }
      entry.base_url = baseUrl || null;
      await api("PUT", "/provider/auth", { providers: { [p.id]: entry } });
      // Write-only: the key leaves the page once sent.
      form.querySelector("input[name=key]") && (form.querySelector("input[name=key]").value = "");
      await loadProviders();
      flash(`Saved ${p.name || p.id}.`);
    });
    box.append(form);
  }
}

// ---------- plugins ----------

async function loadPlugins() {
  const plugins = await list("/plugins");
  const rows = clear($("#plugin-rows"));
  for (const p of plugins) {
    const g = (p.capabilities && p.capabilities.granted) || {};
    const grants = [];
    grants.push(`filesystem: ${g.filesystem ?? "none"}`);
    if (g.http && g.http.length) grants.push(`http: ${g.http.join(", ")}`);
    if (g.process) grants.push("process");
    if (g.env && g.env.length) grants.push(`env: ${g.env.join(", ")}`);
    rows.append(
      h(
        "tr",
        { dataset: { plugin: p.id } },
        h("td", {}, h("strong", {}, p.id), " ", h("span", { class: "hint" }, p.version), h("div", { class: "hint" }, p.description)),
        h("td", {}, p.kind),
        h("td", {}, p.source),
        h("td", {}, h("span", { class: `badge ${p.state === "ready" ? "ok" : p.state === "failed" ? "error" : ""}` }, p.state), p.error ? h("div", { class: "hint" }, p.error) : null),
        h("td", {}, h("ul", { class: "plain" }, grants.map((t) => h("li", {}, t)))),
      ),
    );
  }
}

function setupPlugins() {
  handle($("#plugin-form"), async (data) => {
    const form = new FormData();
    form.append("manifest", data.get("manifest"));
    form.append("wasm", data.get("wasm"));
    const installed = await api("POST", "/plugins", form);
    $("#plugin-form").reset();
    await loadPlugins();
    flash(`Installed ${installed.id}${installed.warnings && installed.warnings.length ? ` — ${installed.warnings.join("; ")}` : ""}.`);
  });
}

// ---------- usage (multi-tenant servers only) ----------

async function detectUsage() {
  try {
    const usage = await probe("/usage");
    $("#nav-usage").hidden = usage === null;
    return usage;
  } catch {
    $("#nav-usage").hidden = true;
    return null;
  }
}

async function loadUsage() {
  const usage = await detectUsage();
  const body = clear($("#usage-body"));
  if (usage === null) {
    body.append(h("p", { class: "hint" }, "This server keeps no per-tenant usage."));
    return;
  }
  const quotas = usage.quotas || {};
  const rows = [];
  const walk = (value, path) => {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) walk(v, [...path, k]);
    } else {
      rows.push([path.join(" · ").replace(/_/g, " "), value]);
    }
  };
  const { quotas: _omit, ...used } = usage;
  walk(used, []);
  // What is used against what is allowed, where both are known.
  const sum = (t) => (t && typeof t === "object" ? (t.input || 0) + (t.output || 0) : t);
  const pairs = [
    ["Tokens today", sum(usage.tokens_today), quotas.tokens_per_day, (n) => n],
    ["Runs at once", usage.active_runs, quotas.max_concurrent_runs, (n) => n],
    ["Sessions", usage.sessions, quotas.max_sessions, (n) => n],
    ["Storage (MB)", usage.storage_bytes, quotas.storage_mb, (n) => Math.round((n / 1048576) * 10) / 10],
  ].filter(([, value]) => value !== undefined && value !== null);
  if (pairs.length) {
    body.append(
      h("h2", {}, "Against quotas"),
      h(
        "table",
        { class: "grid usage" },
        h("tbody", {}, pairs.map(([label, value, quota, show]) => {
          const shown = show(value);
          return h(
            "tr",
            {},
            h("th", { scope: "row" }, label),
            h("td", {}, quota === null || quota === undefined ? `${shown} (no limit)` : `${shown} of ${quota}`),
            h("td", {}, quota ? h("meter", { min: 0, max: quota, value: Math.min(shown, quota), high: quota * 0.8, "aria-label": `${label}: ${shown} of ${quota}` }) : ""),
          );
        })),
      ),
    );
  }
  body.append(
    h("h2", {}, "Used"),
    h("table", { class: "grid" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k), h("td", {}, v === null ? "—" : String(v)))))),
    h("h2", {}, "Quotas"),
    h(
      "table",
      { class: "grid" },
      h("tbody", {}, Object.entries(quotas).map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k.replace(/_/g, " ")), h("td", {}, v === null ? "unlimited" : String(v))))),
    ),
  );
}

// ---------- misc ----------

function flash(text) {
  const note = h("div", { class: "flash", role: "status" }, text);
  document.body.append(note);
  setTimeout(() => note.remove(), 2500);
}

const loaders = {
  chat: loadChat,
  agents: loadAgents,
  sessions: loadSessions,
  providers: loadProviders,
  plugins: loadPlugins,
  usage: loadUsage,
};

async function start() {
  setupChat();
  setupAgents();
  setupPlugins();
  handle($("#signin-form"), async (data) => {
    auth.token = String(data.get("token") || "").trim();
    try {
      await api("GET", "/agents?limit=1");
    } catch (err) {
      auth.token = "";
      throw err;
    }
    $("#signin-token").value = "";
    setSignedIn(true);
    detectUsage();
    await route();
  });
  $("#sign-out").addEventListener("click", () => {
    auth.token = "";
    sessionStorage.clear();
    location.hash = "";
    location.reload();
  });
  window.addEventListener("hashchange", route);
  try {
    setSignedIn(await checkAccess());
    if (signedIn) detectUsage();
  } catch (err) {
    report(err);
  }
  document.body.dataset.ready = "1";
  await route();
}

start();
