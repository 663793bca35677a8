// The page at /: sends URLs and chosen or dropped files to POST /submit as one form, follows
// the task's event stream (GET /tasks/<id>/events) and shows each image's labels as they come.
// The stream is read with fetch rather than EventSource so that an API key can go in a header.
// Recent tasks (GET /tasks) are listed below; opening one shows it as it is and follows it on.
"use strict";

const $ = (id) => document.getElementById(id);
const STREAM_RETRIES = 5;
const RECENT_TASKS = 20;
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

function showTask(accepted, sources, live = true) {
  page.taskId = accepted.task_id;
  $("task").hidden = false;
  $("task-id").textContent = accepted.task_id;
  setStatus($("task-status"), accepted.status); // then each progress event tells it
  $("items").replaceChildren(...sources.map((source, index) => {
    const card = $("item-template").content.firstElementChild.cloneNode(true);
    card.dataset.index = index;
    const thumb = card.querySelector(".thumb");
    thumb.addEventListener("error", () => thumb.removeAttribute("src"), { once: true }); // no broken-image icon
    if (source.thumb) thumb.src = source.thumb;
    card.querySelector(".source").textContent = source.name;
    card.querySelector(".source").title = source.name;
    return card;
  }));
  showProgress({ total: accepted.total, done: 0, succeeded: 0, failed: 0, cancelled: 0 });
  $("cancel").disabled = !live;
  if (live) follow(accepted.task_id);
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
  const card = document.querySelector(`#items .item[data-index="${item.index}"]`);
  if (!card) return;
  setStatus(card.querySelector(".item-status"), item.status);
  card.querySelector(".labels").replaceChildren(...(item.labels || []).map((label) => {
    const entry = element("li", "");
    entry.append(element("span", label.label, "label"), " ", element("span", `${(100 * label.score).toFixed(1)}%`, "score"));
    return entry;
  }));
  card.querySelector(".item-error").textContent = item.error ? `${item.error.code}: ${item.error.message}` : "";
}

function finish(task) {
  showProgress(task.progress);
  setStatus($("task-status"), task.status);
  $("cancel").disabled = true;
  loadRecent();
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

$("submit-form").addEventListener("submit", submit);
$("files").addEventListener("change", (event) => { addFiles([...event.target.files]); event.target.value = ""; });
$("cancel").addEventListener("click", cancel);
$("refresh").addEventListener("click", loadRecent);
$("api-key").addEventListener("change", () => { loadModels(); loadRecent(); });
wireDropZone($("drop-zone"));
loadModels();
loadRecent();
