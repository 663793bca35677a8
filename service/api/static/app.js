// The page at /: sends URLs and chosen or dropped files to POST /submit as one form, follows
// the task's event stream (GET /tasks/<id>/events) and shows each image's labels as they come.
// The stream is read with fetch rather than EventSource so that an API key can go in a header.
// Recent tasks (GET /tasks) are listed below; opening one shows it as it is and follows it on.
// The task shown is in the address (`/#/tasks/<id>`), and its results download as CSV or JSON Lines.
"use strict";

const $ = (id) => document.getElementById(id);
const STREAM_RETRIES = 5;
const RECENT_TASKS = 20;
const PAGE_SIZE = 60; // cards on the page at once
const FINAL = new Set(["completed", "failed", "cancelled"]); // a task's final statuses
const ITEM_FINAL = new Set(["succeeded", "failed", "cancelled"]);
const page = { files: [], taskId: null };

// --- talking to the service -------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const { error } = await response.json();
      message = `${error.code}: ${error.message}`;
    } catch (_) { /* not our JSON error */ }
    throw new Error(message);
  }
  return response;
}

// [event, data] pairs of a Server-Sent Events stream, until the server closes it.
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", name = "message", data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (data.length) yield [name, data.join("\n")];
        name = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        name = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

async function loadModels() {
  try {
    const { default: preferred, models } = await (await api("/models")).json();
    $("model").replaceChildren(...models
      .filter((model) => model.weights_present)
      .map((model) => new Option(model.name, model.name, false, model.name === preferred)));
  } catch (_) {
    // With API keys on, this needs a key: the service's default model is used meanwhile.
  }
}

// --- the form ---------------------------------------------------------------------------

function addFiles(files) {
  page.files.push(...files);
  showChosenFiles();
}

function showChosenFiles() {
  $("chosen-files").replaceChildren(...page.files.map((file) => element("li", file.name)));
}

function showError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = !message;
}

async function submit(event) {
  event.preventDefault();
  const urls = $("urls").value.split("\n").map((line) => line.trim()).filter(Boolean);
  const files = page.files;
  if (!urls.length && !files.length) return showError("Add image URLs or files first.");
  const form = new FormData();
  files.forEach((file) => form.append("files", file, file.name));
  urls.forEach((url) => form.append("urls", url));
  if ($("model").value) form.append("model", $("model").value);
  if ($("top-k").value) form.append("top_k", $("top-k").value);
  showError("");
  $("submit").disabled = true;
  try {
    const accepted = await (await api("/submit", { method: "POST", body: form })).json();
    // The service numbers items in part order: the files, then the URLs.
    const sources = [
      ...files.map((file) => ({ name: file.name, thumb: URL.createObjectURL(file) })),
      ...urls.map((url) => ({ name: url, thumb: url })),
    ];
    page.files = [];
    showChosenFiles();
    $("urls").value = "";
    showTask(accepted, sources);
    loadRecent();
  } catch (error) {
    showError(error.message);
  } finally {
    $("submit").disabled = false;
  }
}

// --- the task ---------------------------------------------------------------------------
// The task's items live in `view.items` (one state per image); only the current page of the
// current filter is on the page as cards, so a 1,000-image task is a page of cards, not 1,000.
// A card is made once, when first shown, and kept up to date as results arrive.

const view = { items: [], cards: new Map(), filter: "all", page: 0, renderSoon: null };

function showTask(accepted, sources, live = true) {
  page.taskId = accepted.task_id;
  if (location.hash !== `#/tasks/${accepted.task_id}`) history.replaceState(null, "", `#/tasks/${accepted.task_id}`);
  $("task").hidden = false;
  $("task-id").textContent = accepted.task_id;
  setStatus($("task-status"), accepted.status); // then each progress event tells it
  view.items = sources.map((source, index) => ({ index, ...describe(source.name), thumb: source.thumb, item: null }));
  view.cards.clear();
  view.filter = "all";
  view.page = 0;
  render();
  showProgress({ total: accepted.total, done: 0, succeeded: 0, failed: 0, cancelled: 0 });
  $("cancel").disabled = !live;
  if (live) follow(accepted.task_id);
}

// What a card calls an image: its file name first, then where it came from.
function describe(source) {
  if (source.startsWith("upload:")) return { source, name: source.slice(7), where: "uploaded file" };
  try {
    const url = new URL(source);
    const parts = url.pathname.split("/").filter(Boolean);
    const last = parts.length ? parts[parts.length - 1] : "";
    let name = url.host;
    try { name = last ? decodeURIComponent(last) : url.host; } catch (_) { name = last; }
    return { source, name, where: url.host + url.pathname.slice(0, url.pathname.length - last.length) };
  } catch (_) {
    return { source, name: source, where: "" };
  }
}

// Follow the event stream to the task's end; if it drops, reconnect (the service replays
// every result so far, and showing an item twice changes nothing).
async function follow(taskId) {
  for (let attempt = 0; attempt <= STREAM_RETRIES && page.taskId === taskId; attempt++) {
    try {
      const response = await api(`/tasks/${taskId}/events`);
      for await (const [event, data] of readEvents(response)) {
        if (page.taskId !== taskId) return; // a newer task took over the page
        const value = JSON.parse(data);
        if (event === "progress") showProgress(value);
        else if (event === "item") showItem(value);
        else if (event === "end") return finish(value);
      }
    } catch (error) {
      if (error.message.startsWith("task_not_found")) return setStatus($("task-status"), "gone");
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function showProgress(progress) {
  if (progress.status) setStatus($("task-status"), progress.status);
  const percent = progress.total ? Math.floor((100 * progress.done) / progress.total) : 100;
  $("progress").max = progress.total;
  $("progress").value = progress.done;
  $("progress-text").textContent =
    `${progress.done} of ${progress.total} done (${percent}%): ${progress.succeeded} classified, ` +
    `${progress.failed} failed, ${progress.cancelled} cancelled`;
}

function showItem(item) {
  const state = view.items[item.index];
  if (!state) return;
  state.item = item;
  const card = view.cards.get(item.index);
  if (card) fillCard(card, state);
  renderSoon(); // the filters' counts, and which items they show
}

// --- cards, filters and pages ------------------------------------------------------------

function topLabel(state) {
  return state.item && state.item.labels && state.item.labels.length ? state.item.labels[0].label : null;
}

function matches(state, filter) {
  if (filter === "all") return true;
  if (filter === "failed" || filter === "cancelled") return state.item !== null && state.item.status === filter;
  return topLabel(state) === filter.slice("label:".length);
}

function render() {
  // The filter choices: all, failed and cancelled (when there are any), then each top label.
  const counts = new Map();
  for (const state of view.items) {
    const status = state.item ? state.item.status : "";
    if (status === "failed" || status === "cancelled") counts.set(status, (counts.get(status) || 0) + 1);
    const label = topLabel(state);
    if (label !== null) counts.set(`label:${label}`, (counts.get(`label:${label}`) || 0) + 1);
  }
  const choices = [["all", `All (${view.items.length})`]];
  for (const status of ["failed", "cancelled"]) {
    if (counts.has(status)) choices.push([status, `${status[0].toUpperCase()}${status.slice(1)} (${counts.get(status)})`]);
  }
  [...counts].filter(([key]) => key.startsWith("label:")).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
    .forEach(([key, count]) => choices.push([key, `${key.slice(6)} (${count})`]));
  if (!choices.some(([key]) => key === view.filter)) view.filter = "all";
  $("filter").replaceChildren(...choices.map(([key, text]) => new Option(text, key, false, key === view.filter)));

  const shown = view.items.filter((state) => matches(state, view.filter));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  view.page = Math.min(view.page, pages - 1);
  const first = view.page * PAGE_SIZE;
  $("items").replaceChildren(...shown.slice(first, first + PAGE_SIZE).map(cardFor));
  $("pager").hidden = pages <= 1;
  $("page-text").textContent =
    `Page ${view.page + 1} of ${pages} (${first + 1}-${Math.min(first + PAGE_SIZE, shown.length)} of ${shown.length})`;
  $("previous").disabled = view.page === 0;
  $("next").disabled = view.page >= pages - 1;
  $("view-controls").hidden = view.items.length === 0;
}

function renderSoon() {
  if (view.renderSoon === null) view.renderSoon = setTimeout(() => { view.renderSoon = null; render(); }, 100);
}

function cardFor(state) {
  let card = view.cards.get(state.index);
  if (!card) {
    card = $("item-template").content.firstElementChild.cloneNode(true);
    card.dataset.index = state.index;
    const thumb = card.querySelector(".thumb");
    thumb.addEventListener("error", () => {
      if (card.querySelector(".placeholder").hidden) showPlaceholder(card, "no preview"); // not over an error code
    }, { once: true });
    if (state.thumb) thumb.src = state.thumb;
    else showPlaceholder(card, "no preview");
    card.querySelector(".source").title = state.source;
    card.querySelector(".name").textContent = state.name;
    card.querySelector(".where").textContent = state.where;
    view.cards.set(state.index, card);
    fillCard(card, state);
  }
  return card;
}

function fillCard(card, state) {
  const item = state.item;
  setStatus(card.querySelector(".item-status"), item ? item.status : "waiting");
  card.querySelector(".labels").replaceChildren(...((item && item.labels) || []).map((label) => {
    const entry = element("li", "");
    entry.append(element("span", label.label, "label"), " ", element("span", `${(100 * label.score).toFixed(1)}%`, "score"));
    return entry;
  }));
  card.querySelector(".item-error").textContent = item && item.error ? `${item.error.code}: ${item.error.message}` : "";
  if (item && item.status === "failed") showPlaceholder(card, item.error ? item.error.code : "failed");
}

// In place of a picture that cannot show (a failed download, a file left on the sender's disk).
function showPlaceholder(card, text) {
  card.querySelector(".thumb").hidden = true;
  const placeholder = card.querySelector(".placeholder");
  placeholder.hidden = false;
  placeholder.textContent = text;
}

function finish(task) {
  showProgress(task.progress);
  setStatus($("task-status"), task.status);
  $("cancel").disabled = true;
  loadRecent();
}

// The results as a file, fetched with the API key (a plain link could not send it).
async function download(format) {
  try {
    const response = await api(`/tasks/${page.taskId}/results?format=${format}`);
    const link = element("a", "");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `task-${page.taskId}.${format}`;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  } catch (error) {
    showError(error.message);
  }
}

// --- recent tasks -----------------------------------------------------------------------

async function loadRecent() {
  try {
    const { tasks } = await (await api(`/tasks?limit=${RECENT_TASKS}`)).json();
    $("recent-empty").hidden = tasks.length > 0;
    $("recent-tasks").replaceChildren(...tasks.map((task) => {
      const entry = element("li", "", "recent-task");
      const open = element("button", task.task_id.slice(0, 8), "link");
      open.type = "button";
      open.title = `open task ${task.task_id}`;
      open.addEventListener("click", () => openTask(task.task_id));
      const status = element("span", "", "status");
      setStatus(status, task.status);
      const when = new Date(task.created_at).toLocaleString();
      entry.append(open, " ", status, ` ${task.progress.done} of ${task.progress.total} done, ${when}`);
      return entry;
    }));
  } catch (_) {
    // With API keys on, this needs a key: listed once one is entered.
  }
}

// Show a task as it is now (every result so far), then follow it if it is still going.
async function openTask(taskId) {
  showError("");
  try {
    const task = await (await api(`/tasks/${taskId}`)).json();
    const sources = task.items.map((item) => ({
      name: item.url,
      thumb: item.url.startsWith("upload:") ? "" : item.url, // uploaded files stayed on the sender's disk
    }));
    const live = !FINAL.has(task.status);
    showTask({ task_id: task.task_id, status: task.status, total: task.items.length }, sources, live);
    task.items.filter((item) => ITEM_FINAL.has(item.status)).forEach(showItem);
    render();
    if (live) showProgress({ ...task.progress, status: task.status });
    else finish(task);
  } catch (error) {
    showError(error.message);
  }
}

async function cancel() {
  $("cancel").disabled = true;
  try {
    const task = await (await api(`/tasks/${page.taskId}/cancel`, { method: "POST" })).json();
    task.items.forEach(showItem);
    finish(task);
  } catch (error) {
    showError(error.message);
    $("cancel").disabled = false;
  }
}

// --- small helpers and wiring -----------------------------------------------------------

function element(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text;
  if (className) node.className = className;
  return node;
}

function setStatus(node, status) {
  node.textContent = status;
  node.dataset.status = status;
}

function wireDropZone(zone) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// A task in the address (`/#/tasks/<id>`): reloading or sharing the page shows it again.
function openFromAddress() {
  const match = location.hash.match(/^#\/tasks\/([0-9a-f]{32})$/);
  if (match && match[1] !== page.taskId) openTask(match[1]);
}

$("submit-form").addEventListener("submit", submit);
$("filter").addEventListener("change", (event) => { view.filter = event.target.value; view.page = 0; render(); });
$("previous").addEventListener("click", () => { view.page -= 1; render(); });
$("next").addEventListener("click", () => { view.page += 1; render(); });
$("download-csv").addEventListener("click", () => download("csv"));
$("download-jsonl").addEventListener("click", () => download("jsonl"));
window.addEventListener("hashchange", openFromAddress);
$("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
$("cancel").addEventListener("click", cancel);
$("refresh").addEventListener("click", loadRecent);
$("api-key").addEventListener("change", () => { loadModels(); loadRecent(); page.taskId = null; openFromAddress(); });
wireDropZone($("drop-zone"));
loadModels();
loadRecent();
openFromAddress();
