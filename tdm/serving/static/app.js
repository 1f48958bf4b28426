// The demo page: plain DOM and fetch against the service's own API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const built = [];          // the history being built: {item_id, title}
let lastQuery = null;      // what the results on screen were asked for

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.message || response.statusText);
  return data;
}

function label(item) {
  return item.title ? `${item.title} (${item.item_id})` : `item ${item.item_id}`;
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.className = "status" + (kind ? " " + kind : "");
}

async function loadModel() {
  const info = await api("/v1/model");
  $("model").textContent =
    `${info.version} · ${info.n_items.toLocaleString()} items · ${info.model_class}`;
}

async function loadUsers() {
  const data = await api("/v1/users?limit=200");
  const select = $("user-select");
  select.replaceChildren();
  for (const user of data.users) {
    const option = document.createElement("option");
    option.value = user.user_id;
    option.textContent = `user ${user.user_id} (${user.events} behaviours)`;
    select.append(option);
  }
  if (!data.users.length) {
    const option = document.createElement("option");
    option.textContent = "no users in the store yet";
    option.disabled = true;
    select.append(option);
    $("mode-history").checked = true;
  } else {
    await showUser();
  }
}

async function showUser() {
  const id = $("user-select").value;
  const list = $("user-history");
  list.replaceChildren();
  if (!id) return;
  const data = await api(`/v1/users/${id}/history`);
  for (const event of data.events.slice(-30)) {
    const li = document.createElement("li");
    li.textContent = event.title || `item ${event.item_id}`;
    if (!event.known) li.className = "unknown";
    list.append(li);
  }
}

let searchTimer = null;
function onSearch() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(async () => {
    const text = $("item-search").value.trim();
    const list = $("search-results");
    list.replaceChildren();
    if (!text) return;
    const data = await api(`/v1/items?q=${encodeURIComponent(text)}&limit=15`);
    for (const item of data.items) {
      const li = document.createElement("li");
      li.textContent = label(item);
      li.dataset.itemId = item.item_id;
      li.addEventListener("click", () => addToHistory(item));
      list.append(li);
    }
  }, 150);
}

function addToHistory(item) {
  built.push({item_id: item.item_id, title: item.title});
  $("mode-history").checked = true;
  drawHistory();
}

function drawHistory() {
  const list = $("history-list");
  list.replaceChildren();
  built.forEach((item, i) => {
    const li = document.createElement("li");
    li.textContent = label(item) + " ";
    const remove = document.createElement("button");
    remove.textContent = "×";
    remove.title = "remove";
    remove.addEventListener("click", () => { built.splice(i, 1); drawHistory(); });
    li.append(remove);
    list.append(li);
  });
}

function currentQuery() {
  const k = parseInt($("k").value, 10) || 10;
  const filter = $("filter").value;
  if ($("mode-user").checked && $("user-select").value) {
    return {user_id: parseInt($("user-select").value, 10), k, filter};
  }
  // a built history: one behaviour a minute, oldest first, ending now
  const now = Math.floor(Date.now() / 1000);
  const history = built.map((item, i) => ({
    item_id: item.item_id, timestamp: now - 60 * (built.length - 1 - i),
  }));
  return {history, k, filter};
}

async function recommend() {
  const query = currentQuery();
  const started = performance.now();
  setStatus("asking…");
  let data;
  try {
    data = await api("/v1/recommend", query);
  } catch (error) {
    setStatus(error.message, "error");
    return;
  }
  lastQuery = query;
  const ms = (performance.now() - started).toFixed(1);
  const notes = [`${data.items.length} items by ${data.model_version} in ${ms} ms`,
                 `${data.history_length} known behaviours`];
  if (data.unknown_items.length) notes.push(`ignored unknown items ${data.unknown_items.join(", ")}`);
  if (data.cold_start) {
    setStatus("cold start: the most popular items (no known behaviour). " + notes.join(" · "), "cold");
  } else {
    setStatus(notes.join(" · "));
  }
  const body = $("results").tBodies[0];
  body.replaceChildren();
  data.items.forEach((item, rank) => {
    const row = body.insertRow();
    row.dataset.itemId = item.item_id;
    row.insertCell().textContent = rank + 1;
    row.insertCell().textContent = item.title || `item ${item.item_id}`;
    row.insertCell().textContent = item.category || `category ${item.category_id}`;
    const score = row.insertCell();
    score.className = "score";
    score.textContent = item.score === null ? "popular" : item.score.toFixed(3);
    row.addEventListener("click", () => showPath(item, row));
  });
}

async function showPath(item, row) {
  for (const other of $("results").tBodies[0].rows) other.classList.remove("picked");
  row.classList.add("picked");
  const body = {item_id: item.item_id};
  if (lastQuery && lastQuery.user_id !== undefined) body.user_id = lastQuery.user_id;
  if (lastQuery && lastQuery.history !== undefined) body.history = lastQuery.history;
  const data = await api("/v1/path", body);
  $("path-title").textContent = `${label(data.item)}: root to leaf, the model's probability per node`;
  const list = $("path");
  list.replaceChildren();
  for (const node of data.nodes) {
    const li = document.createElement("li");
    const what = node.level === 0 ? "root" : `level ${node.level}, node ${node.node_id}`;
    const items = `${node.n_leaves.toLocaleString()} item${node.n_leaves === 1 ? "" : "s"}`;
    const p = node.probability === null ? "" : `, p = ${node.probability.toFixed(3)}`;
    const text = document.createElement("span");
    text.textContent = `${what}: ${items}${p}`;
    const cell = document.createElement("span");
    if (node.probability !== null) {
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(80 * node.probability)}px`;
      cell.append(bar);
    }
    li.append(text, cell);
    list.append(li);
  }
}

$("user-select").addEventListener("change", () => { $("mode-user").checked = true; showUser(); });
$("item-search").addEventListener("input", onSearch);
$("recommend-btn").addEventListener("click", recommend);
Promise.all([loadModel(), loadUsers()]).catch((error) => setStatus(error.message, "error"));
