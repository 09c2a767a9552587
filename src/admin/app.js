// The admin page: the capture inbox, one message, and the activity of every transport.
// Captured mail is untrusted: it is only ever put into the page as text (textContent), and
// an HTML body only into a sandboxed iframe (no scripts, an opaque origin, and this page's
// Content-Security-Policy, which blocks remote content).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 1000;
const PAGE_SIZE = 200;
let view = "inbox";
let current = null;

// The token, when the relay has one: asked once, kept for this tab.
function token() {
  return sessionStorage.getItem("relayToken");
}

async function api(path, options = {}) {
  const headers = options.headers || {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    showLogin(token() ? "That token was not accepted." : "");
    throw new Error("unauthorized");
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response;
}

function showLogin(message) {
  $("login").hidden = false;
  $("login-error").textContent = message;
  for (const id of ["inbox-view", "message-view", "activity-view"]) $(id).hidden = true;
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("relayToken", $("token").value);
  $("token").value = "";
  $("login").hidden = true;
  show(view);
});

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function time(t) {
  // 20261124T231434.123456Z or an RFC 3339 time: shown as local time.
  const m = /^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)/.exec(t || "");
  const d = m ? new Date(Date.UTC(m[1], m[2] - 1, m[3], m[4], m[5], m[6])) : new Date(t);
  return isNaN(d) ? t : d.toLocaleString();
}

function size(n) {
  return n < 1024 ? n + " B" : n < 1048576 ? (n / 1024).toFixed(1) + " KB" : (n / 1048576).toFixed(1) + " MB";
}

function show(name) {
  view = name;
  inboxKey = "";
  activityKey = "";
  $("tab-inbox").classList.toggle("active", name !== "activity");
  $("tab-activity").classList.toggle("active", name === "activity");
  $("inbox-view").hidden = name !== "inbox";
  $("message-view").hidden = name !== "message";
  $("activity-view").hidden = name !== "activity";
  refresh();
}

// ----- inbox -----

const projects = new Set();
let inboxKey = "";
let activityKey = "";

async function loadInbox() {
  const q = new URLSearchParams({ newest: PAGE_SIZE });
  if ($("project-filter").value) q.set("project", $("project-filter").value);
  if ($("search").value) q.set("q", $("search").value);
  const { messages, total } = await (await api("/api/messages?" + q)).json();
  // Redrawn only when something changed: rows stay put under the pointer between polls.
  const key = q + "|" + total + "|" + messages.map((m) => m.id).join(",");
  if (key === inboxKey) return;
  inboxKey = key;
  const body = document.querySelector("#inbox tbody");
  const rows = messages.map((m) => {
    const tr = el("tr", null, "message");
    tr.dataset.id = m.id;
    tr.append(el("td", time(m.received_at)), el("td", m.project || "server"));
    const from = el("td", m.resolved_from);
    if (m.from_rewritten && m.original_from) from.append(el("span", m.original_from, "was"));
    tr.append(from, el("td", (m.recipients || []).join(", ")), el("td", m.subject || ""));
    tr.append(el("td", m.transport), el("td", size(m.size || 0)));
    tr.addEventListener("click", () => openMessage(m.id));
    if (m.project) projects.add(m.project);
    return tr;
  });
  body.replaceChildren(...rows);
  $("count").textContent = total ? "(" + total + ")" : "";
  $("empty").hidden = total > 0;
  $("more").hidden = total <= messages.length;
  $("more").textContent = "Showing the newest " + messages.length + " of " + total + ".";
  const filter = $("project-filter");
  for (const p of [...projects].sort()) {
    if (![...filter.options].some((o) => o.value === p)) filter.append(new Option(p, p));
  }
}

$("project-filter").addEventListener("change", refresh);
$("search").addEventListener("input", refresh);
$("delete-all").addEventListener("click", async () => {
  if (!confirm("Delete every captured message?")) return;
  await api("/api/messages", { method: "DELETE" });
  inboxKey = "";
  refresh();
});

// ----- one message -----

async function openMessage(id) {
  const m = await (await api("/api/messages/" + encodeURIComponent(id))).json();
  current = m;
  view = "message";
  show("message");
  $("m-subject").textContent = m.subject || "(no Subject)";
  $("m-decision").textContent = "From: " + (m.from_decision || (m.from_rewritten ? "replaced" : "kept"));
  const envelope = [
    ["Project", m.project || "server"],
    ["Project header (removed)", m.project_header || "none"],
    ["Transport", m.transport],
    ["Client MAIL FROM", m.client_mail_from],
    ["Upstream MAIL FROM", m.mail_from],
    ["Recipients", (m.recipients || []).join(", ")],
    ["From (resolved)", m.resolved_from],
    ["From (as sent)", m.original_from || "none"],
    ["Received", time(m.received_at)],
    ["Size", size(m.size || 0)],
  ];
  $("m-envelope").replaceChildren(...envelope.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  const list = (m.attachments || []).map((a) => {
    const li = el("li");
    const b = el("button", "Download");
    b.type = "button";
    b.addEventListener("click", () =>
      download("/api/messages/" + encodeURIComponent(m.id) + "/attachments/" + a.index, a.name));
    li.append(el("span", a.name + " (" + a.type + ", " + size(a.size) + ") "), b);
    return li;
  });
  $("m-attachments").replaceChildren(...(list.length ? list : [el("li", "none", "muted")]));
  // No scripts (sandbox without allow-scripts), an opaque origin, and a policy of its own
  // on top of the page's: nothing remote is loaded.
  const policy = "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">";
  $("m-html").srcdoc = policy + (m.html || "");
  $("m-html").hidden = !m.html;
  $("m-html-title").hidden = !m.html;
  $("m-text").textContent = m.text || "(no text body)";
  $("m-headers").tBodies[0].replaceChildren(...(m.headers || []).map(([n, v]) => {
    const tr = el("tr");
    tr.append(el("th", n), el("td", v));
    return tr;
  }));
}

async function download(path, name) {
  const blob = await (await api(path)).blob();
  const a = el("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

$("back").addEventListener("click", () => show("inbox"));
$("download-raw").addEventListener("click", () =>
  download("/api/messages/" + encodeURIComponent(current.id) + "/raw", current.id + ".eml"));
$("delete-one").addEventListener("click", async () => {
  await api("/api/messages/" + encodeURIComponent(current.id), { method: "DELETE" });
  show("inbox");
});

// ----- activity -----

async function loadActivity() {
  const q = new URLSearchParams();
  if ($("activity-project").value) q.set("project", $("activity-project").value);
  if ($("activity-outcome").value) q.set("outcome", $("activity-outcome").value);
  const { entries } = await (await api("/api/activity?" + q)).json();
  const key = q + "|" + entries.length + "|" + (entries.length ? entries[0].seq : 0);
  if (key === activityKey) return;
  activityKey = key;
  const rows = entries.map((e) => {
    const tr = el("tr", null, "activity");
    tr.dataset.outcome = e.outcome;
    tr.append(el("td", time(e.time)), el("td", e.project || "server"), el("td", e.transport));
    tr.append(el("td", e.mail_from), el("td", e.recipients), el("td", size(e.size)));
    tr.append(el("td", e.reply, "code-" + String(e.code)[0]), el("td", e.ms));
    return tr;
  });
  document.querySelector("#activity tbody").replaceChildren(...rows);
}

$("activity-project").addEventListener("input", refresh);
$("activity-outcome").addEventListener("change", refresh);
$("tab-inbox").addEventListener("click", () => show("inbox"));
$("tab-activity").addEventListener("click", () => show("activity"));

// ----- live -----

let busy = false;
async function refresh() {
  if (busy || !$("login").hidden) return;
  busy = true;
  try {
    if (view === "inbox") await loadInbox();
    if (view === "activity") await loadActivity();
  } catch (e) {
    if (e.message !== "unauthorized") console.warn(e);
  } finally {
    busy = false;
  }
}

setInterval(refresh, POLL_MS);
show("inbox");
