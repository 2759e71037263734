// The walk: one prediction followed through the network (POST /api/walk), one step at a time.
// The server runs the model once and returns every stage's numbers (model/inference/walk.py);
// this file only draws them. Each step is an <article data-testid="walk-step" data-stage=...>;
// the current one is shown and marked aria-current="step". The softmax step's slider redraws
// the distribution from the answer (it holds every slider temperature); moving on to the sample
// step after moving the slider walks again at the new temperature, so the token is drawn from
// what the slider shows. Uses app.js's helpers ($, post, visible, barRow, table, GRID, ...).
"use strict";

const walkState = { data: null, index: 0, ids: [], temperature: 1 };

function walkRequest(extra) {
  return {
    temperature: temperature(), temperatures: GRID,
    seed: optionalNumber("seed", (v) => parseInt(v, 10)),
    top_k: optionalNumber("top-k", (v) => parseInt(v, 10)),
    top_p: optionalNumber("top-p", parseFloat),
    ...extra,
  };
}

async function runWalk(body, index) {
  $("walk-where").textContent = "walking…";
  try {
    const data = await post("/api/walk", body);
    walkState.data = data;
    walkState.ids = data.stages[0].tokens.map((t) => t.id);
    walkState.temperature = body.temperature;
    drawWalk(data);
    showStep(Math.min(index, data.stages.length - 1));
  } catch (err) {
    $("walk-where").textContent = "";
    status(`walk: ${err.message}`, true);
  }
}

function perLayer(s) { return s.stage === "attention" || s.stage === "mlp"; }

function stageTitle(s) { return perLayer(s) ? `${s.stage}, layer ${s.layer}` : s.stage; }

function drawWalk(data) {
  const rail = $("walk-rail");
  rail.replaceChildren(...data.stages.map((s, i) => {
    const li = document.createElement("li");
    li.textContent = perLayer(s) ? `${s.layer}·${s.stage}` : s.stage;
    li.title = stageTitle(s);
    li.addEventListener("click", () => goTo(i));
    return li;
  }));
  $("walk-steps").replaceChildren(...data.stages.map((s, i) => stepElement(data, s, i)));
}

function showStep(index) {
  const steps = $("walk-steps").children;
  walkState.index = index;
  [...steps].forEach((step, i) => {
    step.hidden = i !== index;
    if (i === index) step.setAttribute("aria-current", "step");
    else step.removeAttribute("aria-current");
  });
  [...$("walk-rail").children].forEach((li, i) => li.classList.toggle("current", i === index));
  $("walk-prev").disabled = index === 0;
  $("walk-next").disabled = index === steps.length - 1;
  $("walk-where").textContent = `step ${index + 1} of ${steps.length}: ` +
    stageTitle(walkState.data.stages[index]);
}

async function goTo(index) {
  const stages = walkState.data.stages;
  if (index < 0 || index >= stages.length) return;
  const t = parseFloat($("walk-temperature").value);
  if (stages[index].stage === "sample" && t !== walkState.temperature) {
    // The slider moved: draw the token at its temperature.
    await runWalk(walkRequest({ tokens: walkState.ids, temperature: t }), index);
  } else showStep(index);
}

// -- pieces of a step ---------------------------------------------------------------------------
function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(n) { return n.toLocaleString("en-US"); }

function strip(values, label) {
  // A vector as a row of colours: blue positive, orange negative, the strongest the darkest.
  const canvas = el("canvas", "strip");
  canvas.width = Math.max(values.length, 2);
  canvas.height = 1;
  const ctx = canvas.getContext("2d");
  const top = Math.max(...values.map(Math.abs)) || 1;
  values.forEach((v, i) => {
    const a = Math.min(1, Math.abs(v) / top);
    ctx.fillStyle = v >= 0 ? `rgba(37, 99, 235, ${a})` : `rgba(217, 119, 6, ${a})`;
    ctx.fillRect(i, 0, 1, 1);
  });
  canvas.style.imageRendering = "pixelated";
  const norm = Math.sqrt(values.reduce((s, v) => s + v * v, 0));
  const box = el("div");
  const range = `from ${Math.min(...values).toFixed(2)} to ${Math.max(...values).toFixed(2)}`;
  box.append(el("h4", "", `${label}: ${values.length} numbers, ${range}, length ` +
    `${norm.toFixed(2)} (blue > 0, orange < 0)`), canvas);
  return box;
}

function scoredRows(list, label) {
  return [el("h4", "", label), table(list.map((s) => [visible(s.token), s.score]), ["token", "p"])];
}

function lensBlock(lens) {
  const rows = lens.map((s) => barRow(visible(s.token), s.score, "", `token ${s.id}`));
  const box = el("div");
  box.append(el("h4", "", "if the model stopped here (logit lens: final norm, then W_U)"), ...rows);
  return box;
}

function pair(values) { return `(${values.map((v) => v.toFixed(2)).join(", ")})`; }

function shapes(list) {
  return list.length ? list.map((s) => s.join("×")).join(", ") : "none";
}

function paramsBlock(params) {
  const box = el("div", "walk-params");
  for (const p of params) {
    const line = el("div");
    const layers = (n) => (n > 1 ? ` in each of ${n} layers` : "");
    const ours = p.tied_to ? `shares its numbers with ${p.tied_to} (tied)` : p.count === 0
      ? "none: rotary positions are computed, not learned"
      : `${shapes(p.shapes)} = ${fmt(p.count)} parameters${layers(p.layers)}`;
    const theirs = p.gpt3_tied_to ? `tied to its ${p.gpt3_tied_to}, ${shapes(p.gpt3_shapes)}`
      : `${shapes(p.gpt3_shapes)} = ${fmt(p.gpt3_count)}${layers(p.gpt3_layers)}`;
    const what = p.component.includes(p.name) ? p.component : `${p.name} (${p.component})`;
    line.append(el("b", "", what), ` · this model: ${ours} · GPT-3: ${theirs}`);
    box.append(line);
  }
  return box;
}

// -- one step per stage -------------------------------------------------------------------------
function stepElement(data, s, i) {
  const step = el("article", "walk-step");
  step.dataset.testid = "walk-step";
  step.dataset.stage = s.stage;
  step.hidden = true;
  const h = el("h3");
  h.append(el("span", "n", `${i + 1} / ${data.stages.length} · `), stageTitle(s));
  step.append(h, el("p", "caption", s.caption));
  const body = el("div", "cols");
  const draw = { tokens: drawTokens, embedding: drawEmbedding, position: drawPosition,
    attention: drawAttentionStep, mlp: drawMlp, unembedding: drawUnembedding,
    softmax: drawSoftmax, sample: drawSample }[s.stage];
  draw(body, s, data);
  step.append(body);
  if (s.params) step.append(paramsBlock(s.params));
  if (s.stage === "tokens") {
    step.append(el("div", "walk-params", `This model has ${fmt(data.n_params)} parameters; ` +
      `GPT-3 has ${fmt(data.gpt3_params)}. Each step below names the ones it uses.`));
  }
  return step;
}

function drawTokens(body, s) {
  const chips = el("div", "walk-tokens");
  chips.dataset.count = s.tokens.length;
  s.tokens.forEach((t, i) => {
    const chip = el("span", i === s.tokens.length - 1 ? "chip last" : "chip");
    chip.append(el("span", "", visible(t.text)), el("small", "", `${t.id}`));
    chips.append(chip);
  });
  body.append(chips);
}

function drawEmbedding(body, s) {
  const left = el("div");
  const V = s.params[0].shapes.length ? s.params[0].shapes[0][0] : 0;
  left.append(el("h4", "", "the lookup, as a product"), el("div", "equation",
    `one-hot(${s.token.id}) [1 × ${V}] · W_E [${V} × ${s.row.length}] = W_E[${s.token.id}] ` +
    `[1 × ${s.row.length}]` + (s.one_hot_equals_row ? "  ✓ computed: equal to the row" : "")),
  strip(s.row, `row ${s.token.id} of W_E ("${visible(s.token.text)}")`));
  const right = el("div");
  right.append(el("h4", "", "nearest rows of W_E (cosine similarity)"),
    table(s.nearest.map((n) => [visible(n.token), n.score]), ["token", "cosine"]));
  body.append(left, right);
}

function drawPosition(body, s) {
  const left = el("div");
  if (s.kind === "learned") left.append(strip(s.row, `row ${s.position} of W_pos`));
  else {
    left.append(el("h4", "", `a query of layer 0 at position ${s.position}, pair by pair: ` +
      "each pair turns by position × its frequency"),
    table(s.rotations.map((r) => [`pair ${r.pair}`, r.frequency.toPrecision(3),
      `${(r.angle * 180 / Math.PI).toFixed(1)}°`, pair(r.before), pair(r.after)]),
    ["", "radians / position", "angle", "before", "after"]));
  }
  left.append(strip(s.entering, "the vector entering block 0"));
  body.append(left);
}

function drawAttentionStep(body, s, data) {
  const tokens = data.stages[0].tokens;
  const left = el("div");
  const select = el("select");
  select.dataset.testid = "walk-head";
  s.pattern.forEach((_, h) => select.append(new Option(`head ${h}`, h)));
  select.value = s.head;
  const label = el("label", "", "where the last token looks" + (tokens.length > 16
    ? ` (the 16 of ${tokens.length} tokens it weighs most): ` : ": "));
  label.append(select);
  const bars = el("div", "distribution");
  const draw = () => {
    const h = parseInt(select.value, 10);
    const order = tokens.map((_, j) => j);
    if (order.length > 16) order.sort((a, b) => s.pattern[h][b] - s.pattern[h][a]).splice(16);
    bars.replaceChildren(...order.map((j) => barRow(`${visible(tokens[j].text)} @${j}`,
      s.pattern[h][j], "",
      `head ${h} takes ${(100 * s.pattern[h][j]).toFixed(1)}% of this token's value; it wrote ` +
      `a vector of length ${s.written[h][j].toFixed(3)}`)));
  };
  select.addEventListener("change", draw);
  draw();
  left.append(label, bars);
  const right = el("div");
  right.append(el("h4", "", "the tokens that wrote the most into it (all heads, length of the " +
    "vector)"), table(s.sources.map((src) => [`${visible(src.token)} @${src.position}`, src.size]),
    ["token", "size"]),
    lensBlock(s.lens));
  body.append(left, right);
}

function drawMlp(body, s) {
  const left = el("div");
  left.append(el("h4", "", `the most active of its ${s.width} neurons, and the tokens each one's ` +
    "output pushes up"), table(s.neurons.map((n) => [`#${n.index}`, n.activation,
    n.promotes.map((p) => visible(p.token)).join("  ")]), ["neuron", "activation", "promotes"]));
  body.append(left, lensBlock(s.lens));
}

function drawUnembedding(body, s) {
  const left = el("div");
  left.append(strip(s.final, `the final vector after the norm (divided by ${s.scale.toFixed(2)})`));
  const right = el("div");
  right.append(el("h4", "", "the highest logits: the vector · the token's row of W_U (times " +
    "the norm's weights), plus the norm's bias · that row"),
  table(s.top.map((t) => [visible(t.token), t.dot, t.bias, t.logit]),
    ["token", "vector · row", "+ bias", "= logit"]));
  body.append(left, right);
}

function drawSoftmax(body, s) {
  const dist = s.distribution;
  const box = el("div");
  const slider = el("input");
  Object.assign(slider, { type: "range", min: 0, max: 2, step: STEP_T, value: s.temperature,
    id: "walk-temperature" });
  slider.dataset.testid = "walk-temperature";
  const shown = el("output", "", s.temperature.toFixed(2));
  const label = el("label", "", "Temperature ");
  label.append(shown);
  const bars = el("div", "distribution");
  const draw = () => {
    const t = parseFloat(slider.value);
    shown.textContent = t.toFixed(2);
    const j = Math.max(0, dist.temperatures.findIndex((x) => Math.abs(x - t) < 1e-6));
    bars.dataset.temperature = dist.temperatures[j];
    const rows = dist.tokens.map((c, i) => {
      const row = barRow(visible(c.text), dist.probs[j][i], "",
        `token ${c.id}, logit ${c.logit.toFixed(3)}`);
      row.dataset.testid = "walk-top";
      row.dataset.token = c.text;
      row.dataset.id = c.id;
      return row;
    });
    rows.push(barRow("all others", dist.rest[j], "rest", "every token not shown above"));
    bars.replaceChildren(...rows);
  };
  slider.addEventListener("input", draw);
  draw();
  box.append(label, slider, el("p", "hint", "T = 0 shows the plain softmax (greedy takes the " +
    "top bar); the next step draws at the temperature set here."), bars);
  body.append(box);
}

function drawSample(body, s) {
  const box = el("div");
  const drawn = el("div", "drawn", visible(s.token.text));
  drawn.dataset.testid = "walk-drawn";
  drawn.dataset.id = s.token.id;
  const append = el("button", "", `Append "${visible(s.token.text)}" and walk the next token`);
  append.type = "button";
  append.dataset.testid = "walk-append";
  append.addEventListener("click", async () => {
    await runWalk(walkRequest({ tokens: [...walkState.ids, s.token.id],
      temperature: s.temperature }), 0);
    if (walkState.data) $("prompt").value = walkState.data.stages[0].text;
  });
  const p = `token ${s.token.id}, probability ${(100 * s.prob).toFixed(1)}%`;
  box.append(drawn, el("p", "hint", p), append);
  body.append(box);
}

// -- start --------------------------------------------------------------------------------------
$("walk-start").addEventListener("click",
  () => runWalk(walkRequest({ prompt: $("prompt").value }), 0));
$("walk-prev").addEventListener("click", () => goTo(walkState.index - 1));
$("walk-next").addEventListener("click", () => goTo(walkState.index + 1));
$("walk").addEventListener("keydown", (e) => {
  if (!walkState.data || ["INPUT", "SELECT", "TEXTAREA"].includes(e.target.tagName)) return;
  if (e.key === "ArrowRight") goTo(walkState.index + 1);
  if (e.key === "ArrowLeft") goTo(walkState.index - 1);
});
