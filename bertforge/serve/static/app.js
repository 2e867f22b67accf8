// bertforge playground: plain JavaScript over the JSON API of `bertforge serve`; no libraries, no network
// access beyond this server. User text is only ever inserted with textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const SPECIAL = new Set(["[CLS]", "[SEP]", "[PAD]"]);
const COLORS = ["#2f6fdb", "#d9480f", "#2b8a3e", "#9c36b5", "#e8590c", "#0b7285", "#c2255c", "#5c940d"];
let models = [];

// ------------------------------------------------------------------------------------------------- helpers

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({error: `the server answered ${response.status}`}));
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

// Runs `work` with the button disabled and its error line cleared; an error's message goes to the line.
async function guarded(button, errorBox, work) {
  button.disabled = true;
  errorBox.textContent = "";
  try {
    await work();
  } catch (error) {
    errorBox.textContent = error.message;
  } finally {
    button.disabled = false;
  }
}

function bar(name, score) {
  const percent = (100 * score).toFixed(1);
  return el("div", {class: "candidate"}, [
    el("span", {class: "name", text: name, title: name}),
    el("div", {class: "track"}, [el("div", {class: "bar", style: `width: ${percent}%`})]),
    el("span", {class: "value", text: `${percent}%`}),
  ]);
}

function fillSelect(select, names) {
  const previous = select.value;
  select.replaceChildren(...names.map((name) => el("option", {value: name, text: name})));
  if (names.includes(previous)) select.value = previous;
}

function debounce(fn, ms) {
  let timer;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// ------------------------------------------------------------------------------------------------- pages

function showPage() {
  const page = (location.hash || "#fill-mask").slice(1);
  for (const section of document.querySelectorAll(".page")) {
    section.classList.toggle("active", section.id === `page-${page}`);
  }
  for (const link of document.querySelectorAll("#tabs a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  if (page === "runs") loadRun();
}

async function loadModels() {
  models = await api("/api/models");
  for (const select of document.querySelectorAll("select[data-kinds]")) {
    const kinds = select.dataset.kinds.split(" ");
    const names = models.filter((m) => kinds.includes(m.kind)).map((m) => m.name);
    fillSelect(select, names);
    if (!names.length) select.append(el("option", {value: "", text: `(no ${kinds.join("/")} model served)`}));
  }
  showTask();
}

// ------------------------------------------------------------------------------------------------- fill-mask

// The text's words as chips (each CJK character alone, as a character-level vocabulary reads it); a click
// replaces that word with [MASK] and predicts.
function renderWords() {
  const words = $("fm-text").value.split(/(\s+|\[MASK\]|[\u3400-\u9fff])/);
  $("fm-words").replaceChildren(...words.map((word, index) => {
    if (!word.trim() || word === "[MASK]") return "";
    const chip = el("span", {text: word, title: "click to mask this word"});
    chip.addEventListener("click", () => {
      words[index] = "[MASK]";
      $("fm-text").value = words.join("");
      renderWords();
      fillMask(false);
    });
    return chip;
  }));
}

let fillMaskRequest = 0;  // only the newest request's answer is shown (typing sends several)

async function fillMask(automatic) {
  if (!$("fm-model").value || (automatic && !$("fm-text").value.includes("[MASK]"))) return;
  const request = ++fillMaskRequest;
  await guarded($("fm-run"), $("fm-error"), async () => {
    const result = await api("/api/fill-mask", {
      model: $("fm-model").value, text: $("fm-text").value, top_k: Number($("fm-topk").value) || 5});
    if (request !== fillMaskRequest) return;
    const masked = new Set(result.masks.map((m) => m.position));
    const tokens = el("div", {class: "tokens"}, result.tokens.map((token, i) =>
      el("span", {class: masked.has(i) ? "masked" : "", text: token})));
    const blocks = result.masks.map((mask, k) => el("div", {class: "mask-block"}, [
      el("h4", {text: `[MASK] ${k + 1} (token ${mask.position})`}),
      ...mask.candidates.map((c) => bar(c.token, c.score)),
    ]));
    $("fm-results").replaceChildren(tokens, ...blocks);
  });
}

// ------------------------------------------------------------------------------------------------- NSP

const NSP_PRESETS = {
  "nsp-preset-next": ["the man went to the store .", "he bought a gallon of milk ."],
  "nsp-preset-notnext": ["the man went to the store .", "penguins are flightless birds ."],
};

async function nsp() {
  await guarded($("nsp-run"), $("nsp-error"), async () => {
    const result = await api("/api/nsp", {model: $("nsp-model").value, a: $("nsp-a").value, b: $("nsp-b").value});
    const verdict = result.is_next >= 0.5 ? "IsNext" : "NotNext";
    $("nsp-result").replaceChildren(
      el("div", {class: "big", id: "nsp-probability", text: `${(100 * result.is_next).toFixed(1)}%`}),
      el("p", {class: "hint", text: `P(B follows A): ${verdict}`}),
      bar("IsNext", result.is_next), bar("NotNext", 1 - result.is_next));
  });
}

// ------------------------------------------------------------------------------------------------- attention

let attentionResult = null;
let selectedHead = [0, 0];

function visibleIndices(tokens) {
  const hide = $("att-hide").checked;
  return tokens.map((t, i) => i).filter((i) => !(hide && SPECIAL.has(tokens[i])));
}

// Draws weights[query][key] (rows: queries, columns: keys) of the `keep` tokens as shades of the accent colour,
// darkest at the head's largest shown weight (weights spread evenly over many tokens would all look white on
// an absolute scale); `cell` pixels per token.
function heatmap(canvas, matrix, keep, cell) {
  const context = canvas.getContext("2d");
  const largest = Math.max(1e-9, ...keep.flatMap((q) => keep.map((k) => matrix[q][k])));
  keep.forEach((q, row) => keep.forEach((k, column) => {
    context.fillStyle = `rgba(47, 111, 219, ${(matrix[q][k] / largest).toFixed(3)})`;
    context.fillRect(column * cell, row * cell, cell, cell);
  }));
}

function drawGrid() {
  const {tokens, layers, heads, weights} = attentionResult;
  const keep = visibleIndices(tokens);
  const grid = $("att-grid");
  grid.style.gridTemplateColumns = `auto repeat(${heads}, auto)`;
  const cells = [el("span", {class: "label", text: ""})];
  for (let h = 0; h < heads; h++) cells.push(el("span", {class: "label", text: `head ${h}`}));
  for (let l = 0; l < layers; l++) {
    cells.push(el("span", {class: "label", text: `layer ${l}`}));
    for (let h = 0; h < heads; h++) {
      const size = Math.max(1, keep.length);
      const canvas = el("canvas", {width: size, height: size, title: `layer ${l}, head ${h}`,
                                   "data-layer": l, "data-head": h});
      canvas.classList.toggle("selected", l === selectedHead[0] && h === selectedHead[1]);
      heatmap(canvas, weights[l][h], keep, 1);
      canvas.addEventListener("click", () => { selectedHead = [l, h]; drawGrid(); });
      cells.push(canvas);
    }
  }
  grid.replaceChildren(...cells);
  drawDetail(keep);
}

function drawDetail(keep) {
  const [layer, head] = selectedHead;
  const tokens = keep.map((i) => attentionResult.tokens[i]);
  const cell = Math.max(10, Math.min(28, Math.floor(480 / Math.max(1, keep.length))));
  const measure = document.createElement("canvas").getContext("2d");
  measure.font = "12px sans-serif";
  const margin = 8 + Math.max(...tokens.map((t) => measure.measureText(t).width), 0);
  const size = margin + cell * keep.length;
  const canvas = el("canvas", {width: Math.ceil(size), height: Math.ceil(size), id: "att-detail-canvas"});
  const matrix = attentionResult.weights[layer][head];
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.save();
  context.translate(margin, margin);
  heatmap(canvas, matrix, keep, cell);
  context.restore();
  context.font = "12px sans-serif";
  context.fillStyle = "#1f2430";
  context.textBaseline = "middle";
  tokens.forEach((token, i) => {
    context.textAlign = "right";
    context.fillText(token, margin - 4, margin + (i + 0.5) * cell);  // queries down the left
    context.save();
    context.translate(margin + (i + 0.5) * cell, margin - 4);
    context.rotate(-Math.PI / 2);
    context.textAlign = "left";
    context.fillText(token, 0, 0);  // keys along the top
    context.restore();
  });
  canvas.addEventListener("mousemove", (event) => {  // the weight under the pointer, as a tooltip
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width;
    const row = Math.floor(((event.clientY - box.top) * scale - margin) / cell);
    const column = Math.floor(((event.clientX - box.left) * scale - margin) / cell);
    const inside = row >= 0 && column >= 0 && row < keep.length && column < keep.length;
    canvas.title = inside ? `${tokens[row]} → ${tokens[column]}: ${matrix[keep[row]][keep[column]].toFixed(4)}` : "";
  });
  $("att-detail").replaceChildren(
    el("h3", {text: `Layer ${layer}, head ${head}`}),
    el("p", {class: "hint", text: "rows: each token's attention over the tokens in the columns; darkest = this "
                                  + "head's largest weight"}), canvas);
}

async function attention() {
  await guarded($("att-run"), $("att-error"), async () => {
    const body = {model: $("att-model").value, text: $("att-text").value};
    if ($("att-text-b").value.trim()) body.text_b = $("att-text-b").value;
    attentionResult = await api("/api/attention", body);
    selectedHead = [Math.min(selectedHead[0], attentionResult.layers - 1),
                    Math.min(selectedHead[1], attentionResult.heads - 1)];
    drawGrid();
  });
}

// ------------------------------------------------------------------------------------------------- fine-tuned

function currentModel() {
  return models.find((m) => m.name === $("ft-model").value);
}

function showTask() {
  const model = currentModel();
  const kind = model ? model.kind : "";
  $("ft-kind").textContent = kind;
  for (const name of ["classify", "ner", "qa"]) $(`ft-${name}`).classList.toggle("active", name === kind);
  $("ft-text-b-label").style.display = model && model.text_count === 2 ? "" : "none";
  $("ft-result").replaceChildren();
}

// `text` with the [start, end) spans marked, each with its label, as DOM nodes.
function highlighted(text, spans) {
  const nodes = [];
  let cursor = 0;
  for (const span of [...spans].sort((a, b) => a.start - b.start)) {
    if (span.start < cursor) continue;
    nodes.push(text.slice(cursor, span.start));
    nodes.push(el("mark", {}, [text.slice(span.start, span.end), el("span", {class: "type", text: span.label})]));
    cursor = span.end;
  }
  nodes.push(text.slice(cursor));
  return el("div", {class: "highlight"}, nodes);
}

async function predict() {
  const model = currentModel();
  if (!model) return;
  await guarded($("ft-run"), $("ft-error"), async () => {
    const body = {model: model.name};
    if (model.kind === "classify") {
      body.text = $("ft-text").value;
      if (model.text_count === 2) body.text_b = $("ft-text-b").value;
    } else if (model.kind === "ner") {
      body.text = $("ft-ner-text").value;
    } else {
      body.question = $("ft-question").value;
      body.context = $("ft-context").value;
    }
    const result = await api("/api/predict", body);
    if (model.kind === "classify" && result.label === null) {
      $("ft-result").replaceChildren(el("div", {class: "big", text: result.value.toFixed(4)}));
    } else if (model.kind === "classify") {
      const rows = Object.entries(result.scores).sort((a, b) => b[1] - a[1]).map(([name, p]) => bar(name, p));
      $("ft-result").replaceChildren(el("div", {class: "big", id: "ft-label", text: result.label}), ...rows);
    } else if (model.kind === "ner") {
      const spans = result.entities.map((e) => ({start: e.start, end: e.end, label: e.type}));
      const summary = result.entities.length ? `${result.entities.length} entities` : "no entities found";
      $("ft-result").replaceChildren(highlighted(body.text, spans), el("p", {class: "hint", text: summary}));
    } else {
      const spans = result.answer ? [{start: result.start, end: result.end, label: result.score.toFixed(3)}] : [];
      $("ft-result").replaceChildren(
        el("div", {class: "big", id: "ft-answer", text: result.answer || "(no answer found)"}),
        highlighted(body.context, spans));
    }
  });
}

// ------------------------------------------------------------------------------------------------- runs

let runTimer = null;

// Rows of metrics.jsonl -> {series name: [[step, value], ...]} for the keys `wanted` accepts.
function series(rows, wanted) {
  const out = {};
  for (const row of rows) {
    if (row.event !== undefined || typeof row.step !== "number") continue;
    const split = row.split || "train";
    for (const [key, value] of Object.entries(row)) {
      if (typeof value !== "number" || !wanted(key)) continue;
      (out[`${split} ${key}`] ||= []).push([row.step, value]);
    }
  }
  return out;
}

// Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten, about `count` of them.
function ticks(low, high, count, integer) {
  if (low === high) {  // a single value: a range around it
    const pad = integer ? 1 : Math.abs(low) * 0.1 || 1;
    [low, high] = [low - pad, high + pad];
  }
  const rough = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(rough));
  let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  if (integer) step = Math.max(1, Math.round(step));
  const first = Math.floor(low / step) * step;
  const out = [];
  for (let value = first; value < high + step; value += step) out.push(Number(value.toPrecision(12)));
  return out;
}

// One line per series; the colour says the quantity, the dash the split (solid: training).
function lineChart(container, lines) {
  const names = Object.keys(lines);
  if (!names.length) {
    container.replaceChildren(el("p", {class: "hint", text: "no values logged yet"}));
    return;
  }
  const quantities = [...new Set(names.map((name) => name.split(" ")[1]))];
  const color = (name) => COLORS[quantities.indexOf(name.split(" ")[1]) % COLORS.length];
  const dashed = (name) => !name.startsWith("train ");
  const points = names.flatMap((name) => lines[name]);
  const xTicks = ticks(Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0])), 6, true);
  const yTicks = ticks(Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1])), 5, false);
  const [x0, x1, y0, y1] = [xTicks[0], xTicks.at(-1), yTicks[0], yTicks.at(-1)];
  const W = 600, H = 260, left = 52, right = 14, top = 10, bottom = 34;
  const sx = (x) => left + (x - x0) / (x1 - x0) * (W - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  for (const y of yTicks) {
    add("line", {x1: left, x2: W - right, y1: sy(y), y2: sy(y), stroke: "#eef1f4"});
    add("text", {x: left - 6, y: sy(y) + 4, "text-anchor": "end"}, String(y));
  }
  for (const x of xTicks) add("text", {x: sx(x), y: H - 18, "text-anchor": "middle"}, String(x));
  add("text", {x: left + (W - left - right) / 2, y: H - 3, "text-anchor": "middle"}, "step");
  add("rect", {x: left, y: top, width: W - left - right, height: H - top - bottom, fill: "none", stroke: "#d9dee5"});
  for (const name of names) {
    const path = lines[name].map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    add("polyline", {points: path, fill: "none", stroke: color(name), "stroke-width": 2, class: "series",
                     "data-name": name, "stroke-dasharray": dashed(name) ? "6 4" : "none"});
    for (const p of lines[name].length < 30 ? lines[name] : []) {
      add("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color(name)});
    }
  }
  const legend = el("div", {class: "legend"}, names.map((name) =>
    el("span", {}, [el("i", {style: `border-top: 3px ${dashed(name) ? "dashed" : "solid"} ${color(name)}`}), name])));
  container.replaceChildren(svg, legend);
}

async function loadRun() {
  clearTimeout(runTimer);
  const name = $("run-name").value;
  if (!name || location.hash !== "#runs") return;
  try {
    const path = `/api/runs/${encodeURIComponent(name)}`;
    const [info, rows] = await Promise.all([api(path), api(`${path}/metrics`)]);
    $("run-error").textContent = "";
    lineChart($("run-loss"), series(rows, (key) => key.endsWith("loss")));
    lineChart($("run-accuracy"), series(rows, (key) => /accuracy|^f1$|^exact/.test(key)));
    $("run-checkpoints").replaceChildren(...(info.checkpoints.length ? info.checkpoints : ["(none yet)"])
      .map((c) => el("li", {text: c})));
    $("run-config").textContent = info.config ? JSON.stringify(info.config, null, 2) : "(no config.json)";
    $("run-updated").textContent = `${rows.length} rows, updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("run-error").textContent = error.message;
  }
  if ($("run-live").checked) runTimer = setTimeout(loadRun, 5000);
}

async function loadRuns() {
  const runs = await api("/api/runs");
  fillSelect($("run-name"), runs.map((r) => r.name));
  if (!runs.length) $("run-name").append(el("option", {value: "", text: "(no run served)"}));
}

// ------------------------------------------------------------------------------------------------- wiring

function wire() {
  $("fm-run").addEventListener("click", () => fillMask(false));
  $("fm-text").addEventListener("input", renderWords);
  $("fm-text").addEventListener("input", debounce(() => fillMask(true), 400));
  $("fm-model").addEventListener("change", () => fillMask(true));
  $("fm-topk").addEventListener("change", () => fillMask(true));
  $("nsp-run").addEventListener("click", nsp);
  for (const [id, [a, b]] of Object.entries(NSP_PRESETS)) {
    $(id).addEventListener("click", () => { $("nsp-a").value = a; $("nsp-b").value = b; nsp(); });
  }
  $("att-run").addEventListener("click", attention);
  $("att-hide").addEventListener("change", () => attentionResult && drawGrid());
  $("ft-model").addEventListener("change", showTask);
  $("ft-run").addEventListener("click", predict);
  $("run-name").addEventListener("change", loadRun);
  $("run-live").addEventListener("change", loadRun);
  window.addEventListener("hashchange", showPage);
}

async function start() {
  wire();
  renderWords();
  try {
    await Promise.all([loadModels(), loadRuns()]);
  } catch (error) {
    $("fm-error").textContent = `cannot reach the server: ${error.message}`;
  }
  document.body.dataset.ready = "true";
  showPage();
  fillMask(true);
}

start();
