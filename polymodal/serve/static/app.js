// polymodal playground: plain JS against the server's own OpenAI-compatible API (no CDN, no build step).
// Untrusted text (the user's, errors, file names) is only ever set as textContent; model replies go
// through markdown.js, which builds DOM nodes and never parses HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "Authorization": "Bearer " + key } : {};
}

function headers() {
  return { "Content-Type": "application/json", ...authHeaders() };
}

// One chat turn: the bubble (.msg) and, for replies, a Copy button beside it (outside the text).
function addMessage(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  turn.appendChild(div);
  if (role === "assistant") {
    div.dataset.raw = "";
    const tools = document.createElement("div");
    tools.className = "tools";
    tools.appendChild(copyButton(() => div.dataset.raw));
    turn.appendChild(tools);
  }
  $("messages").appendChild(turn);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setReply(div, raw) {
  div.dataset.raw = raw;
  renderMarkdown(raw, div);
}

function fill(select, models) {
  select.replaceChildren();
  for (const m of models) {
    const o = document.createElement("option");
    o.value = o.textContent = o.title = m.id;
    select.appendChild(o);
  }
  select.title = select.value;
  select.addEventListener("change", () => showFullName(select));
  showFullName(select);
}

// A name wider than the select (which keeps to its panel) is also written out whole under it.
function showFullName(select) {
  select.title = select.value;
  let full = select.parentElement.querySelector(".model-full");
  if (!full) {
    full = document.createElement("span");
    full.className = "model-full";
    select.insertAdjacentElement("afterend", full);
  }
  const st = getComputedStyle(select);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = st.font;
  // the room for text: the select's width less its padding, borders and drop-down arrow (~20 px)
  const room = select.offsetWidth - ["paddingLeft", "paddingRight", "borderLeftWidth", "borderRightWidth"]
    .reduce((a, k) => a + parseFloat(st[k] || 0), 0) - 20;
  full.textContent = select.value;
  full.hidden = !select.value || ctx.measureText(select.value).width <= room + 4;
}

async function errorText(resp) {
  try { const j = await resp.json(); return j.error ? j.error.message : JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

// Reads an SSE body: "data: {...}\n\n" events, "data: [DONE]" at the end.
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function sendChat(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  let raw = "";
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  $("chat-status").textContent = "generating...";
  const t0 = performance.now();
  let nChunks = 0, tFirst = null;
  try {
    const system = $("system-prompt").value.trim();
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: $("chat-model").value, stream: true,
        messages: system ? [{ role: "system", content: system }, ...history] : history,
        temperature: parseFloat($("temperature").value),
        top_p: parseFloat($("top-p").value) || 1,
        // blank = the server's default: whatever room the context has left
        ...($("max-tokens").value ? { max_tokens: parseInt($("max-tokens").value, 10) } : {}),
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (tFirst === null) tFirst = performance.now();
        raw += delta.content;
        setReply(out, raw);
        nChunks++;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: raw });
    const secs = (performance.now() - t0) / 1000;
    $("chat-status").textContent = `${nChunks} chunks in ${secs.toFixed(2)} s` +
      (tFirst !== null ? `, first after ${((tFirst - t0) / 1000).toFixed(2)} s` : "");
  } catch (e) {
    if (e.name === "AbortError") { $("chat-status").textContent = "stopped"; history.push({ role: "assistant", content: raw }); }
    else { out.className = "msg error"; out.textContent = "Error: " + e.message; history.pop(); $("chat-status").textContent = ""; }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function askVision(ev) {
  ev.preventDefault();
  const file = $("image-file").files[0];
  if (!file) { $("vision-answer").textContent = "Choose an image first."; return; }
  const url = await readAsDataURL(file);
  $("vision-answer").textContent = "";
  let raw = "";
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("vision-model").value, stream: true, messages: [{ role: "user", content: [
      { type: "text", text: $("vision-question").value }, { type: "image_url", image_url: { url } }] }] }),
  });
  if (!resp.ok) { $("vision-answer").textContent = "Error: " + await errorText(resp); return; }
  for await (const chunk of sseEvents(resp)) {
    const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (d && d.content) { raw += d.content; renderMarkdown(raw, $("vision-answer")); }
  }
}

async function search(ev) {
  ev.preventDefault();
  const box = $("search-results");
  box.textContent = "searching...";
  while (blobUrls.length) URL.revokeObjectURL(blobUrls.pop());
  const resp = await fetch("/playground/search", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("search-model").value, query: $("search-query").value, top_k: 12 }),
  });
  if (!resp.ok) { box.textContent = "Error: " + await errorText(resp); return; }
  const { results, skipped } = await resp.json();
  box.textContent = results.length ? "" : "no images in the folder";
  $("search-status").textContent = skipped ? `${skipped} unreadable image(s) skipped` : "";
  await Promise.all(results.map((r) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = r.file;
    const cap = document.createElement("figcaption");
    cap.textContent = `${r.file} (${r.score.toFixed(3)})`;
    fig.append(img, cap);
    box.appendChild(fig);
    return showImage(img, "/playground/images/" + r.file.split("/").map(encodeURIComponent).join("/"));
  }));
}

// Images are fetched with the API key header (an <img src> request could not carry it) and
// shown from a blob: URL, released when the next search replaces them.
const blobUrls = [];
async function showImage(img, url) {
  const resp = await fetch(url, { headers: authHeaders() });
  if (!resp.ok) { img.alt = `${img.alt} (${resp.status})`; return; }
  const u = URL.createObjectURL(await resp.blob());
  blobUrls.push(u);
  img.src = u;
}

async function init() {
  $("api-key").value = localStorage.getItem("polymodal-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("polymodal-api-key", $("api-key").value));
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history.length = 0; $("messages").replaceChildren(); });
  $("vision-form").addEventListener("submit", askVision);
  $("image-file").addEventListener("change", () => {
    const f = $("image-file").files[0];
    if (f) { $("image-preview").src = URL.createObjectURL(f); $("image-preview").hidden = false; }
  });
  $("search-form").addEventListener("submit", search);

  const resp = await fetch("/playground/config", { headers: headers() });
  if (!resp.ok) { $("chat-status").textContent = "Error: " + await errorText(resp); return; }
  const cfg = await resp.json();
  const gen = cfg.models.filter((m) => m.kind === "generate");
  const vlm = gen.filter((m) => m.vision);
  const clip = cfg.models.filter((m) => m.kind === "clip");
  fill($("chat-model"), gen);
  if (!gen.length) { $("send").disabled = true; $("chat-status").textContent = "No text generation model is served."; }
  if (vlm.length) { fill($("vision-model"), vlm); $("vision-form").hidden = false; $("vision-none").hidden = true; }
  if (clip.length && cfg.image_dir) { fill($("search-model"), clip); $("search-form").hidden = false; $("search-none").hidden = true; }
  const names = () => document.querySelectorAll("select").forEach((s) => s.options.length && showFullName(s));
  window.addEventListener("resize", names);
  names();  // now that the panels are shown, their selects have a width
  document.body.dataset.ready = "1";  // for tests: the page has loaded its configuration
}

init();
