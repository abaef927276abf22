// A small, safe Markdown renderer for model output: it builds DOM nodes (createElement +
// textContent), never HTML strings, so nothing a model writes can become markup or script.
// Supported: ``` fenced code (with a copy button), `inline code`, **bold**, *italic* / _italic_,
// # headings, - / * / 1. lists, > quotes, [links](https://...) (http, https and mailto only),
// paragraphs. Anything else stays literal text.
"use strict";

const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => el("code", m[1]) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: (m) => wrap("strong", m[1]) },
  { re: /(^|[^\w*])\*(?=\S)([^*\n]*?\S)\*(?!\w)/, lead: 1, make: (m) => wrap("em", m[2]) },
  { re: /(^|[^\w])_(?=\S)([^_\n]*?\S)_(?!\w)/, lead: 1, make: (m) => wrap("em", m[2]) },
  { re: /\[([^\]\n]+)\]\(([^)\s]+)\)/, make: (m) => link(m[1], m[2]) },
];

function el(tag, text) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  return e;
}

function wrap(tag, inner) {
  const e = document.createElement(tag);
  inline(inner, e);
  return e;
}

function link(text, url) {
  let ok = false;
  try { ok = ["http:", "https:", "mailto:"].includes(new URL(url, location.href).protocol); } catch (e) { ok = false; }
  if (!ok) return document.createTextNode(`[${text}](${url})`);
  const a = el("a", text);
  a.href = url;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

// Appends `text` to `parent`, turning the earliest inline construct into an element, repeatedly.
function inline(text, parent) {
  while (text) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(text);
      if (m && (best === null || m.index + (rule.lead ? m[1].length : 0) < best.at)) {
        best = { m, rule, at: m.index + (rule.lead ? m[1].length : 0) };
      }
    }
    if (best === null) { parent.appendChild(document.createTextNode(text)); return; }
    if (best.at > 0) parent.appendChild(document.createTextNode(text.slice(0, best.at)));
    parent.appendChild(best.rule.make(best.m));
    text = text.slice(best.m.index + best.m[0].length);
  }
}

function copyButton(getText) {
  const b = el("button", "Copy");
  b.type = "button";
  b.className = "copy";
  b.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(getText()); b.textContent = "Copied"; }
    catch (e) { b.textContent = "Copy failed"; }
    setTimeout(() => { b.textContent = "Copy"; }, 1200);
  });
  return b;
}

const LIST_ITEM = /^\s*([-*+]|\d{1,3}[.)])\s+(.*)$/;

// Renders Markdown `src` into `root` (its previous children are replaced).
function renderMarkdown(src, root) {
  root.replaceChildren();
  const lines = src.split("\n");
  let i = 0, para = [];
  const flush = () => {
    if (para.length) { const p = el("p"); inline(para.join("\n"), p); root.appendChild(p); para = []; }
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^\s*```\s*([\w+.#-]*)\s*$/.exec(line);
    if (fence) {
      flush();
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      i++;  // the closing fence (or the end of a reply still streaming)
      const pre = el("pre"), code = el("code", body.join("\n"));
      if (fence[1]) code.dataset.lang = fence[1];
      pre.append(code, copyButton(() => code.textContent));
      root.appendChild(pre);
      continue;
    }
    const h = /^(#{1,6})\s+(.*)$/.exec(line);
    const item = LIST_ITEM.exec(line);
    if (h) {
      flush();
      const e = el("h" + Math.min(h[1].length + 2, 6));  // h3..h6: inside a chat bubble
      inline(h[2], e);
      root.appendChild(e);
    } else if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered) list.start = parseInt(item[1], 10);
      for (let m; i < lines.length && (m = LIST_ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered; i++) {
        const li = el("li");
        inline(m[2], li);
        list.appendChild(li);
      }
      root.appendChild(list);
      continue;
    } else if (/^>\s?/.test(line)) {
      flush();
      const q = el("blockquote");
      const body = [];
      for (; i < lines.length && /^>\s?/.test(lines[i]); i++) body.push(lines[i].replace(/^>\s?/, ""));
      inline(body.join("\n"), q);
      root.appendChild(q);
      continue;
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
}

window.renderMarkdown = renderMarkdown;
window.copyButton = copyButton;
