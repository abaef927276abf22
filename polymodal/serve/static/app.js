// polymodal playground: plain JS against the server's own OpenAI-compatible API (no CDN, no build step).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function fill(select, models) {
  select.innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = o.textContent = m.id;
    select.appendChild(o);
  }
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
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  $("chat-status").textContent = "generating...";
  const t0 = performance.now();
  let nChunks = 0, tFirst = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: $("chat-model").value, messages: history, stream: true,
        temperature: parseFloat($("temperature").value),
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
        out.textContent += delta.content;
        nChunks++;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: out.textContent });
    const secs = (performance.now() - t0) / 1000;
    $("chat-status").textContent = `${nChunks} chunks in ${secs.toFixed(2)} s` +
      (tFirst !== null ? `, first after ${((tFirst - t0) / 1000).toFixed(2)} s` : "");
  } catch (e) {
    if (e.name === "AbortError") { $("chat-status").textContent = "stopped"; history.push({ role: "assistant", content: out.textContent }); }
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
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("vision-model").value, stream: true, messages: [{ role: "user", content: [
      { type: "text", text: $("vision-question").value }, { type: "image_url", image_url: { url } }] }] }),
  });
  if (!resp.ok) { $("vision-answer").textContent = "Error: " + await errorText(resp); return; }
  for await (const chunk of sseEvents(resp)) {
    const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
    if (d && d.content) $("vision-answer").textContent += d.content;
  }
}

async function search(ev) {
  ev.preventDefault();
  const box = $("search-results");
  box.textContent = "searching...";
  const resp = await fetch("/playground/search", {
    method: "POST", headers: headers(),
    body: JSON.stringify({ model: $("search-model").value, query: $("search-query").value, top_k: 12 }),
  });
  if (!resp.ok) { box.textContent = "Error: " + await errorText(resp); return; }
  const { results } = await resp.json();
  box.textContent = results.length ? "" : "no images in the folder";
  for (const r of results) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "/playground/images/" + r.file.split("/").map(encodeURIComponent).join("/");
    img.alt = r.file;
    const cap = document.createElement("figcaption");
    cap.textContent = `${r.file} (${r.score.toFixed(3)})`;
    fig.append(img, cap);
    box.appendChild(fig);
  }
}

async function init() {
  $("api-key").value = localStorage.getItem("polymodal-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("polymodal-api-key", $("api-key").value));
  $("chat-form").addEventListener("submit", sendChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { history.length = 0; $("messages").innerHTML = ""; });
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
  document.body.dataset.ready = "1";  // for tests: the page has loaded its configuration
}

init();
