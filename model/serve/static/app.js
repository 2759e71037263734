// The playground: streams tokens from POST /api/generate, shows the distribution behind each
// one (POST /api/distribution, at every slider temperature at once so the slider redraws
// without asking the server), attention (POST /api/attention) and embeddings (/api/neighbors,
// /api/analogy, /api/direction). Two modes: completion (a prompt continued) and chat (a
// conversation: the server applies the chat template to the messages; each reply's tokens are
// shaded and clickable like a completion's). Plain JavaScript, no libraries, nothing from the
// network.
"use strict";

const $ = (id) => document.getElementById(id);
const STEP_T = 0.05; // the slider's step; the distribution is fetched at each of its positions
const GRID = Array.from({ length: Math.round(2 / STEP_T) + 1 }, (_, i) => +(i * STEP_T).toFixed(2));
const SHOWN = 10; // bars besides the picked token and the rest
const VISIBLE = { " ": "·", "\n": "↵", "\t": "→", "\r": "␍" };

// A generation: {ids, promptLen, steps, settings, controller, grids, attention}; in chat mode
// every reply keeps its own, so a token of an earlier reply can still be selected.
let run = null; // the latest generation
let selected = null; // {run, index}: the selected step
let mode = "completion";
const conversation = []; // chat mode: the turns so far, {role, content}
let modelNote = ""; // chat mode: what to know about this model (not fine-tuned for chat)

function visible(text) {
  const shown = [...text].map((c) => VISIBLE[c] ?? c).join("");
  return shown || "∅";
}

function status(message, isError = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", isError);
}

async function post(path, body) {
  const res = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
  return data;
}

function temperature() { return parseFloat($("temperature").value); }

function optionalNumber(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? null : parse(v);
}

// -- modes ------------------------------------------------------------------------------------
function setMode(next) {
  if (run && run.controller) run.controller.abort();
  mode = next;
  document.body.classList.toggle("chat", mode === "chat");
  const chat = mode === "chat";
  $("prompt-label").textContent = chat ? "Message" : "Prompt";
  $("prompt").placeholder = chat ? "Write a message; Ctrl+Enter sends it"
    : "Type the beginning of a text";
  $("generate").textContent = chat ? "Send" : "Generate";
  $("output-title").textContent = chat ? "Conversation" : "Text";
  resetOutput();
}

function resetOutput() {
  conversation.length = 0;
  run = null;
  selected = null;
  $("output").replaceChildren();
  $("distribution").replaceChildren();
  $("distribution-caption").textContent = "select a generated token";
}

function turnElement(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  turn.dataset.testid = `turn-${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  turn.append(who);
  if (text !== undefined) turn.append(text);
  $("output").append(turn);
  return turn;
}

// -- generation ---------------------------------------------------------------------------
async function generate() {
  if (run && run.controller) run.controller.abort();
  const chat = mode === "chat";
  const settings = {
    temperature: temperature(), k: SHOWN,
    max_tokens: optionalNumber("max-tokens", (v) => parseInt(v, 10)) ?? 100,
    top_k: optionalNumber("top-k", (v) => parseInt(v, 10)),
    top_p: optionalNumber("top-p", parseFloat),
    seed: optionalNumber("seed", (v) => parseInt(v, 10)),
  };
  const message = $("prompt").value;
  let body, target, turns = [];
  if (chat) {
    if (!message.trim()) { status("write a message first", true); return; }
    const system = $("system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation,
      { role: "user", content: message }];
    body = { ...settings, messages };
    if (conversation.length === 0 && system) turns.push(turnElement("system", system));
    turns.push(turnElement("user", message));
    target = turnElement("assistant");
    turns.push(target);
  } else {
    body = { ...settings, prompt: message };
    $("output").replaceChildren();
    $("distribution").replaceChildren();
    $("distribution-caption").textContent = "select a generated token";
    target = $("output");
    selected = null;
  }
  const controller = new AbortController();
  const mine = { ids: [], promptLen: 0, steps: [], settings, controller, grids: new Map(),
    target, chat, attention: message, reply: "" };
  run = mine;
  $("generate").disabled = true;
  $("stop").disabled = false;
  status("generating…");
  let kept = true; // chat: the turn stays in the conversation
  try {
    const res = await fetch("/api/generate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const data = await res.json().catch(() => ({}));
      throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
    }
    let done = false; // a stream cut off without "done" (the server went away) is no success
    await readEvents(res, (event) => {
      done = done || event.type === "done";
      onEvent(mine, event);
    });
    const last = mine.steps[mine.steps.length - 1];
    const ended = last && last.finished && last.finished !== "length";
    if (chat && ended) target.classList.add("ended");
    if (done) {
      status(`${mine.steps.length} tokens generated` +
        (chat ? (ended ? ", the reply ended its turn" : ", the reply hit max tokens") : ""));
    } else status(`the stream ended early, after ${mine.steps.length} tokens`, true);
  } catch (err) {
    if (err.name === "AbortError") status(`stopped after ${mine.steps.length} tokens`);
    else if (err.name === "StreamError") {
      status(`generation failed after ${mine.steps.length} tokens: ${err.message}`, true);
    } else {
      status(err.message, true);
      kept = mine.steps.length > 0;
    }
  } finally {
    if (run === mine) {
      run.controller = null;
      $("generate").disabled = false;
      $("stop").disabled = true;
    }
  }
  if (chat) {
    if (kept) {
      conversation.push({ role: "user", content: message }, { role: "assistant", content: mine.reply });
      $("prompt").value = "";
      $("chat-note").textContent = `${conversation.length / 2} exchange(s) so far; each ` +
        `message is sent with the whole conversation. ${modelNote}`;
    } else turns.forEach((t) => t.remove()); // refused: the message stays in the box to edit
  }
  if (run === mine) showAttention();
}

async function readEvents(res, handle) {
  // Server-sent events over fetch (EventSource cannot POST): "data: {json}" blocks. An "error"
  // event (generation failed after the stream began) is thrown as a StreamError.
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const event = JSON.parse(line.slice(6));
          if (event.type === "error") {
            const err = new Error(event.message);
            err.name = "StreamError";
            throw err;
          }
          handle(event);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // an error left the stream unread: let it go
  }
}

function onEvent(r, event) {
  if (event.type === "prompt") {
    for (const t of event.tokens) {
      r.ids.push(t.id);
      if (r.chat) continue; // the conversation shows as turns, not as the template's tokens
      const span = document.createElement("span");
      span.className = "ptok";
      span.dataset.testid = "prompt-token";
      span.textContent = t.text.replace(/\n/g, "↵\n");
      span.title = `prompt token ${t.id}`;
      r.target.append(span);
    }
    r.promptLen = event.tokens.length;
  } else if (event.type === "token") {
    r.steps.push(event);
    r.ids.push(event.token);
    r.reply += event.delta;
    if (r.chat && event.finished === "eot") return; // the end of the turn, not reply text
    r.target.append(tokenSpan(r, event));
    $("output").scrollTop = $("output").scrollHeight;
  }
}

function tokenSpan(r, step) {
  const span = document.createElement("span");
  span.className = "tok";
  span.dataset.testid = "token";
  span.dataset.index = step.index;
  span.dataset.prob = step.prob;
  const alpha = 0.08 + 0.8 * step.prob;
  span.style.background = `rgba(37, 99, 235, ${alpha.toFixed(3)})`;
  if (alpha > 0.5) span.style.color = "#fff";
  span.textContent = step.text.replace(/\n/g, "↵\n") || "∅";
  span.title = `${visible(step.text)}  p = ${step.prob.toFixed(3)}`;
  span.addEventListener("click", () => select(r, step.index));
  step.span = span;
  return span;
}

// -- the distribution of a step ---------------------------------------------------------------
async function select(r, index) {
  selected = { run: r, index };
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  const step = r.steps[index];
  if (step.span) step.span.classList.add("selected");
  if (!r.grids.has(index)) {
    drawFromStep(r, step); // what the stream said, until the full grid arrives
    const start = r.promptLen + index;
    try {
      r.grids.set(index, await post("/api/distribution", {
        tokens: r.ids.slice(step.context_start, start), temperatures: GRID, k: SHOWN,
        top_k: r.settings.top_k, top_p: r.settings.top_p, include: [step.token],
      }));
    } catch (err) {
      status(err.message, true);
      return;
    }
  }
  if (selected && selected.run === r && selected.index === index) drawDistribution();
}

function drawFromStep(r, step) {
  const bars = step.top.map((t) => ({ id: t.id, text: t.text, prob: t.prob }));
  if (!bars.some((b) => b.id === step.token)) {
    bars.push({ id: step.token, text: step.text, prob: step.prob });
  }
  const rest = Math.max(0, 1 - bars.reduce((s, b) => s + b.prob, 0));
  drawBars(bars, rest, step.token,
    `step ${step.index}: picked "${visible(step.text)}" at T = ${r.settings.temperature}`);
}

function drawDistribution() {
  if (selected === null || !selected.run.grids.has(selected.index)) return;
  const r = selected.run;
  const grid = r.grids.get(selected.index);
  const step = r.steps[selected.index];
  const j = Math.round(temperature() / STEP_T);
  const bars = grid.tokens.map((t, i) => ({ id: t.id, text: t.text, prob: grid.probs[j][i] }));
  const t = GRID[j];
  const how = t === 0 ? "T = 0: greedy picks the top bar; bars show softmax(logits)"
    : `softmax(logits / ${t.toFixed(2)})`;
  drawBars(bars, grid.rest[j], step.token,
    `step ${step.index}: picked "${visible(step.text)}" (drawn at T = ${r.settings.temperature}); ${how}`);
}

function drawBars(bars, rest, picked, caption) {
  $("distribution-caption").textContent = caption;
  const panel = $("distribution");
  panel.dataset.temperature = temperature();
  const rows = bars.map((b) => barRow(visible(b.text), b.prob, b.id === picked ? "picked" : "",
    b.id === picked ? "picked token" : `token ${b.id}`));
  rows.push(barRow("all others", rest, "rest", "every token not shown above"));
  panel.replaceChildren(...rows);
}

function barRow(label, prob, kind, title) {
  const row = document.createElement("div");
  row.className = `bar-row ${kind}`;
  row.dataset.testid = "bar";
  row.dataset.prob = prob;
  row.title = title;
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = (kind === "picked" ? "★ " : "") + label;
  const track = document.createElement("span");
  track.className = "track";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.display = "block";
  fill.style.width = `${(100 * prob).toFixed(2)}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = prob >= 0.001 || prob === 0 ? prob.toFixed(3) : prob.toExponential(1);
  row.append(name, track, value);
  return row;
}

// -- attention ------------------------------------------------------------------------------
async function showAttention() {
  const head = $("attention-head").value;
  const prompt = run ? run.attention : $("prompt").value; // chat: the last message sent
  if (!prompt) return;
  try {
    const map = await post("/api/attention", {
      prompt, layer: parseInt($("attention-layer").value, 10),
      head: head === "" ? null : parseInt(head, 10),
    });
    drawAttention(map);
  } catch (err) {
    status(`attention: ${err.message}`, true);
  }
}

function drawAttention(map) {
  const canvas = $("attention-canvas");
  const n = map.tokens.length;
  const cell = Math.max(6, Math.min(28, Math.floor(520 / n)));
  const labels = map.tokens.map((t) => visible(t).slice(0, 8));
  const ctx = canvas.getContext("2d");
  ctx.font = "11px monospace";
  const margin = 8 + Math.max(...labels.map((l) => ctx.measureText(l).width));
  canvas.width = Math.ceil(margin + n * cell + 4);
  canvas.height = Math.ceil(margin + n * cell + 4);
  ctx.font = "11px monospace";
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      const w = map.weights[q][k];
      ctx.fillStyle = k > q ? "#f5f7fa" : `rgba(16, 42, 67, ${Math.min(1, w).toFixed(3)})`;
      ctx.fillRect(margin + k * cell, margin + q * cell, cell - 1, cell - 1);
    }
  }
  ctx.fillStyle = "#1f2933";
  ctx.textBaseline = "middle";
  const step = Math.max(1, Math.ceil(11 / cell)); // skip labels that would overlap
  for (let i = 0; i < n; i += step) {
    ctx.textAlign = "right";
    ctx.fillText(labels[i], margin - 4, margin + i * cell + cell / 2);
    ctx.save();
    ctx.translate(margin + i * cell + cell / 2, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(labels[i], 0, 0);
    ctx.restore();
  }
  const container = $("attention");
  container.dataset.cells = n * n;
  container.dataset.layer = map.layer;
  container.dataset.head = map.head === null ? "mean" : map.head;
  const which = map.head === null ? "mean of heads" : `head ${map.head}`;
  $("attention-readout").textContent = `layer ${map.layer}, ${which}: hover a cell`;
  canvas.onmousemove = (e) => {
    const rect = canvas.getBoundingClientRect();
    const k = Math.floor((e.clientX - rect.left - margin) / cell);
    const q = Math.floor((e.clientY - rect.top - margin) / cell);
    if (q < 0 || k < 0 || q >= n || k >= n) return;
    $("attention-readout").textContent = `"${visible(map.tokens[q])}" (${q}) attends to ` +
      `"${visible(map.tokens[k])}" (${k}): ${map.weights[q][k].toFixed(3)}`;
  };
}

// -- embeddings -------------------------------------------------------------------------------
function table(rows, header) {
  const t = document.createElement("table");
  const head = document.createElement("tr");
  for (const h of header) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  t.append(head);
  for (const row of rows) {
    const tr = document.createElement("tr");
    row.forEach((v, i) => {
      const td = document.createElement("td");
      td.textContent = typeof v === "number" ? v.toFixed(3) : v;
      if (i > 0 && typeof v === "number") td.className = "num";
      tr.append(td);
    });
    t.append(tr);
  }
  return t;
}

function note(text) {
  const p = document.createElement("p");
  p.className = "note";
  p.textContent = text;
  return p;
}

function describe(w) {
  return w.multi_token ? `"${w.word}" is ${w.ids.length} tokens (${w.pieces.map(visible).join(" + ")}): their mean`
    : `"${w.word}" as "${visible(w.form)}" is one token`;
}

function embeddingForm(id, path, body, render) {
  $(id).addEventListener("submit", async (e) => {
    e.preventDefault();
    const out = $("embeddings");
    try {
      out.replaceChildren(...render(await post(path, body())));
    } catch (err) {
      out.replaceChildren(note(err.message));
    }
  });
}

embeddingForm("neighbors-form", "/api/neighbors", () => ({ word: $("neighbors-word").value }),
  (r) => [note(describe(r.query)),
    table(r.neighbors.map((s) => [visible(s.token), s.score]), ["nearest", "cosine"])]);
embeddingForm("analogy-form", "/api/analogy",
  () => ({ a: $("analogy-a").value, b: $("analogy-b").value, c: $("analogy-c").value }),
  (r) => [...r.words.map((w) => note(describe(w))),
    table(r.answers.map((s) => [visible(s.token), s.score]), ["A − B + C ≈", "cosine"])]);
embeddingForm("direction-form", "/api/direction",
  () => ({ positive: $("direction-pos").value, negative: $("direction-neg").value,
           words: $("direction-words").value }),
  (r) => [note(`direction E(${r.positive.word}) − E(${r.negative.word}), length ${r.norm.toFixed(3)}`),
    table(r.projections.map((p) => [p.word.word, p.dot, p.cosine]), ["word", "dot", "cosine"])]);

// -- start ------------------------------------------------------------------------------------
async function start() {
  $("generate").addEventListener("click", generate);
  document.querySelectorAll('input[name="mode"]').forEach((radio) => {
    radio.addEventListener("change", () => { if (radio.checked) setMode(radio.value); });
  });
  $("chat-reset").addEventListener("click", () => {
    resetOutput();
    $("chat-note").textContent = modelNote;
    status("");
  });
  $("stop").addEventListener("click", () => { if (run && run.controller) run.controller.abort(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = temperature().toFixed(2);
    drawDistribution();
  });
  $("attention-layer").addEventListener("change", showAttention);
  $("attention-head").addEventListener("change", showAttention);
  $("attention-show").addEventListener("click", showAttention);
  document.querySelectorAll(".origin").forEach((e) => { e.textContent = location.origin; });
  try {
    const info = await (await fetch("/api/info")).json();
    $("model-info").textContent = `${info.description} · context ${info.block_size} tokens · ` +
      `${info.n_layer} layers × ${info.n_head} heads · ${info.tokenizer} tokenizer, ` +
      `${info.vocab_size} tokens` + (info.chat_trained ? " · chat-trained" : "");
    modelNote = info.chat_trained ? "" : "This model was not fine-tuned on conversations: " +
      "it still answers (the chat template is plain text to it), but may not end its turn.";
    $("chat-note").textContent = modelNote;
    if (info.steering) {  // every forward pass adds a steering vector: say so on the page
      const s = info.steering;
      $("steering-notice").textContent = `Steering vector on: ${s.file} × ${s.scale} added ` +
        `to ${s.hook} at every position; every output of this server is steered.`;
      $("steering-notice").hidden = false;
    }
    document.querySelectorAll(".model-id").forEach((e) => { e.textContent = info.model; });
    $("max-tokens").max = info.max_tokens;
    for (let i = 0; i < info.n_layer; i++) $("attention-layer").append(new Option(`${i}`, i));
    $("attention-layer").value = info.n_layer - 1;
    for (let h = 0; h < info.n_head; h++) $("attention-head").append(new Option(`${h}`, h));
  } catch (err) {
    status(`cannot reach the server: ${err.message}`, true);
  }
}

start();
