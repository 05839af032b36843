// stagewise serve: the bedside page. Plain JavaScript, no libraries, nothing fetched from elsewhere.
// Each file is sent to POST /explain under a neutral name ("upload" + its extension), so the
// server never sees a file name; names stay in this page and in the CSV the user downloads.
"use strict";

const state = { card: null, validation: null, rows: [], maxUpload: 64 * 1024 * 1024, counter: 0, queue: Promise.resolve() };
const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (p, digits = 1) => `${(100 * p).toFixed(digits)} %`;
const fmt = (x, digits = 3) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits));
const svgNS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function extension(name) {
  const lower = name.toLowerCase();
  for (const ext of [".nii.gz", ".dicom", ".jpeg", ".tiff", ".png", ".jpg", ".dcm", ".nii", ".bmp", ".tif"]) {
    if (lower.endsWith(ext)) return ext;
  }
  return "";
}

// ---------------------------------------------------------------- model card
async function loadCard() {
  try {
    const [card, validation] = await Promise.all([
      fetch("/model-card").then((r) => r.json()),
      fetch("/validation").then((r) => r.json()),
    ]);
    state.card = card;
    state.validation = validation;
    state.maxUpload = card.max_upload_bytes;
    $("#limit").textContent = `${+(card.max_upload_bytes / 1048576).toFixed(1)} MB`;
    $("#model-title").textContent = `${card.title}: ${[...new Set(card.outputs.map(outcomeText))].join(", ")}`;
    $("#version").textContent = `stagewise ${card.stagewise} (bundle made with ${card.bundle_stagewise}), scoring with ${card.engine === "onnx" ? "ONNX Runtime" : "PyTorch"}`;
    renderCard(card);
  } catch (err) {
    $("#model-title").textContent = "The model could not be loaded";
    $("#card-body").replaceChildren(el("p", { class: "message", text: "The server did not answer; is it still running?" }));
  }
}

// the outcome as people read it: the recipe's label and time frame, else its column name
const outcomeText = (o) => o.outcome_text || o.outcome;

function cohortText(c, outcome) {
  if (!c) return null;
  let text = `${c.images} images of ${c.patients} patients; ${c.positive_patients} patients with ${outcome} (${pct(c.prevalence_patients)})`;
  return text;
}

function renderCard(card) {
  const body = [];
  body.push(el("p", { class: "warning", text: card.warning }));
  if (card.intensity_notice) body.push(el("p", { class: "warning", text: card.intensity_notice }));
  const dl = el("dl");
  const item = (k, v) => { if (v) dl.append(el("dt", { text: k }), el("dd", { text: v })); };
  item("Intended use", card.intended_use);
  item("Trained on", card.cohort ? `${cohortText(card.cohort, outcomeText(card.outputs[0]))}; this model: ${card.trained_on}` : card.trained_on);
  if (card.cohort && card.cohort.sites) {
    item("Sites", Object.entries(card.cohort.sites).map(([s, c]) => `${s} (${c.patients} patients)`).join(", "));
  }
  if (card.protocol) {
    const p = card.protocol;
    const scheme = p.kind === "group_kfold" ? `${p.folds}-fold cross-validation, patients kept within one fold` : p.kind.replaceAll("_", " ");
    item("Validation", `${scheme}${p.repeats > 1 ? `, repeated ${p.repeats} times` : ""}; fold thresholds ${card.fold_thresholds || `chosen on training data (${p.threshold})`}`);
  } else {
    item("Validation", `${card.outputs[0].n_folds} cross-validation folds`);
  }
  item("Training", [...new Set(card.outputs.map((o) => o.training).filter(Boolean))].join("; "));
  item("Input", `${card.input.dimensions === 2 ? "one 2D image" : "one 3D volume"}, resized (${card.input.resize}) to ${card.input.image_size} px; ${card.input.intensities}`);
  item("Network", card.backbone);
  item("Software", `stagewise ${card.stagewise}; bundle exported by stagewise ${card.bundle_stagewise}`);
  item("Privacy", card.privacy);
  body.push(dl);

  const details = el("details", {}, el("summary", { text: "Validation figures" }));
  details.append(el("p", { class: "hint", text: "AUROC: how well the probability ranks patients with the outcome above those without (0.5 = chance, 1 = perfect). Balanced accuracy and F1 here are for each fold's decision at that fold's own threshold. Mean ± SD over the cross-validation folds; 95 % confidence intervals over patients." }));
  for (const o of card.outputs) {
    const table = el("table");
    table.append(el("caption", { class: "visually-hidden", text: `Validation figures for ${outcomeText(o)}` }));
    const head = el("tr", {}, el("th", { scope: "col", text: `${outcomeText(o)}${card.outputs.length > 1 ? ` (${o.output})` : ""}` }),
      el("th", { scope: "col", text: `Mean ± SD over ${o.n_folds} folds` }), el("th", { scope: "col", text: "95 % CI (patients)" }));
    table.append(el("thead", {}, head));
    const tbody = el("tbody");
    const names = { auroc: "AUROC", balanced_accuracy: "Balanced accuracy", f1: "F1" };
    for (const [m, label] of Object.entries(names)) {
      const s = o.cross_validated[m];
      if (!s) continue;
      let ci = "not stored";
      const pl = o.patient_level_ci;
      if (pl) {
        const b = pl.bootstrap_ci && pl.bootstrap_ci[m];
        if (b) ci = `${fmt(b.point)} (${fmt(b.low)} to ${fmt(b.high)})`;
        else if (m === "auroc" && pl.auroc_delong_ci) ci = `${fmt(pl.auroc_delong_ci.point)} (${fmt(pl.auroc_delong_ci.low)} to ${fmt(pl.auroc_delong_ci.high)}, DeLong)`;
        else ci = "–";
      }
      tbody.append(el("tr", {}, el("th", { scope: "row", text: label }), el("td", { class: "num", text: `${fmt(s.mean)} ± ${fmt(s.sd)}` }), el("td", { class: "num", text: ci })));
    }
    tbody.append(el("tr", {}, el("th", { scope: "row", text: "Decision threshold" }), el("td", { class: "num", text: pct(o.threshold) }), el("td", { text: o.threshold_source || "chosen on training data" })));
    table.append(tbody);
    details.append(table);
    if (o.at_threshold) details.append(atThresholdTable(o, card.outputs.length > 1));
  }
  if (!card.validation_distribution) {
    details.append(el("p", { text: "This bundle does not store its cross-validated out-of-fold probabilities (it was exported by an older stagewise), so results cannot be placed against them. Export it again to add them." }));
  }
  body.push(details);
  $("#card-body").replaceChildren(...body);
}

function atThresholdTable(o, several) {
  // the decision rule this page applies: the cross-validated models' scores at this model's threshold
  const a = o.at_threshold;
  const wrap = el("div");
  wrap.append(el("p", { class: "hint", text: `At this model's threshold of ${pct(a.threshold)}, the decision rule this page applies: the cross-validated models' scores (each of ${a.n_patients} patients scored by a model that did not train on it, not by this model) decided at this threshold; 95 % confidence intervals over patients.` }));
  const table = el("table");
  table.append(el("caption", { class: "visually-hidden", text: `Figures at the threshold for ${o.outcome}` }));
  table.append(el("thead", {}, el("tr", {}, el("th", { scope: "col", text: `${o.outcome}${several ? ` (${o.output})` : ""} at ${pct(a.threshold)}` }),
    el("th", { scope: "col", text: "Cross-validated models' scores" }), el("th", { scope: "col", text: "95 % CI (patients)" }))));
  const tbody = el("tbody");
  const names = { sensitivity: "Sensitivity", specificity: "Specificity", ppv: "PPV", npv: "NPV", balanced_accuracy: "Balanced accuracy" };
  for (const [m, label] of Object.entries(names)) {
    const f = a[m];
    if (!f) continue;
    const ci = f.low === null || f.high === null ? "–" : `${fmt(f.low)} to ${fmt(f.high)}`;
    tbody.append(el("tr", { "data-metric": m }, el("th", { scope: "row", text: label }), el("td", { class: "num", text: fmt(f.point) }), el("td", { class: "num", text: ci })));
  }
  table.append(tbody);
  wrap.append(table);
  return wrap;
}

// ---------------------------------------------------------------- scoring
function addFiles(files) {
  const list = Array.from(files);
  if (!list.length) return;
  for (const file of list) {
    const id = ++state.counter;
    const li = el("li", { class: "result pending", id: `result-${id}` },
      el("article", {}, el("h3", { class: "file" }, el("span", { class: "name", text: file.name })),
        el("p", { class: "message", text: "Waiting…" })));
    $("#results").append(li);
    state.queue = state.queue.then(() => score(file, li, id));
  }
  state.queue = state.queue.then(() => setStatus(`${state.rows.length} file${state.rows.length === 1 ? "" : "s"} scored or checked.`));
  setStatus(`Scoring ${list.length} file${list.length === 1 ? "" : "s"}…`);
}

function setStatus(text) {
  $("#status").textContent = text;
  const any = $("#results").children.length > 0;
  $("#download").disabled = !state.rows.length;
  $("#clear").disabled = !any;
}

async function score(file, li, id) {
  li.querySelector(".message").textContent = "Scoring…";
  if (file.size > state.maxUpload) {
    return fail(li, file, `The file is larger than the ${+(state.maxUpload / 1048576).toFixed(1)} MB this server accepts.`);
  }
  const form = new FormData();
  form.append("file", file, "upload" + extension(file.name));
  let response, body;
  try {
    response = await fetch("/explain", { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    return fail(li, file, "The server did not answer. Is it still running?");
  }
  if (!response.ok) return fail(li, file, body.message || `The server answered ${response.status}.`, body.error);
  render(li, file, body, id);
  state.rows.push({ file: file.name, outputs: body.outputs, error: "" });
}

function fail(li, file, message, code) {
  li.className = "result failed";
  li.dataset.error = code || "error";
  li.querySelector(".message").textContent = message;
  li.querySelector(".message").setAttribute("role", "alert");
  state.rows.push({ file: file.name, outputs: null, error: message });
}

function render(li, file, body, id) {
  const node = $("#result-template").content.firstElementChild.cloneNode(true);
  node.id = li.id;
  node.querySelector(".name").textContent = file.name;
  const src = body.source || {};
  const facts = [src.format !== "other" ? src.format : null, src.modality, src.view_position,
    src.width ? `${src.width} × ${src.height} px${src.depth ? ` × ${src.depth}` : ""}` : null].filter((f) => f && f !== "other");
  node.querySelector(".source").textContent = facts.join(" · ");
  const net = node.querySelector("img.net");
  const cam = node.querySelector("img.cam");
  net.src = body.network_view;
  const size = state.card ? state.card.input.image_size : null;
  if (size && size < 160) { net.classList.add("small"); cam.classList.add("small"); }
  const notes = (src.notes || []).join("; ");
  node.querySelector(".view-caption").textContent =
    `What the model saw${size ? ` (${size} × ${size} px` : " ("}${state.card ? `, ${state.card.input.resize === "pad" ? "padded to a square" : state.card.input.resize === "crop" ? "cropped to a square" : "stretched to a square"}` : ""})${notes ? `: ${notes}` : ""}. Check that it is the right way up and that the contrast looks right.`;

  // heat map controls
  const toggle = node.querySelector(".cam-toggle");
  const which = node.querySelector(".cam-which");
  toggle.id = `cam-${id}`;
  node.querySelector(".cam-label").setAttribute("for", toggle.id);
  which.id = `cam-which-${id}`;
  node.querySelector(".cam-which-label").setAttribute("for", which.id);
  const maps = (body.saliency || []).filter((s) => s.image);
  // a heat map that cannot be drawn gets a sentence saying why, never an empty image
  const missing = (body.saliency || []).filter((s) => !s.image && s.note);
  if (!maps.length) {
    toggle.disabled = true;
    node.querySelector(".cam-controls").hidden = true;
    const note = node.querySelector(".cam-note");
    note.hidden = false;
    note.textContent = body.saliency_note || (missing.length ? missing[0].note : "No heat map for this image.");
  } else {
    for (const m of maps) which.append(el("option", { value: m.output, text: outcomeOf(body, m.output) }));
    which.hidden = maps.length < 2;
    const note = node.querySelector(".cam-note");
    note.textContent = "Red marks the regions that pushed this score up the most. The heat map shows where the model looked, not what it found."
      + missing.map((s) => ` ${outcomeOf(body, s.output)}: ${s.note}`).join("");
    const show = () => {
      const m = maps.find((s) => s.output === which.value) || maps[0];
      cam.src = m.image;
      cam.hidden = !toggle.checked;
      note.hidden = !toggle.checked;
    };
    toggle.addEventListener("change", show);
    which.addEventListener("change", show);
  }

  const scores = node.querySelector(".scores");
  for (const o of body.outputs) scores.append(renderOutput(o, body.outputs.length > 1));
  li.replaceWith(node);
}

function outcomeOf(body, output) {
  const o = body.outputs.find((x) => x.output === output);
  return o ? outcomeText(o) : output;
}

function renderOutput(o, several) {
  const state = o.state || (o.decision ? "flagged" : "below_threshold");
  const sec = el("section", { class: "output", "data-output": o.output, "data-probability": String(o.probability),
    "data-decision": String(o.decision), "data-threshold": String(o.threshold), "data-state": state });
  sec.append(el("h4", { text: several ? `Probability of ${outcomeText(o)} (${o.output})` : `Probability of ${outcomeText(o)}` }));
  sec.append(el("p", { class: "prob" }, el("span", { class: "value", text: pct(o.probability) }),
    el("span", { class: "unit", text: "estimated probability" })));
  // below the threshold is stated neutrally (grey, no reassuring word): a 29.5 % risk is not a reassurance
  sec.append(el("p", { class: `decision ${state === "flagged" ? "flagged" : "below"}`,
    text: o.statement || (state === "flagged" ? `Flagged: at or above the decision threshold of ${pct(o.threshold)}` : `Below the decision threshold of ${pct(o.threshold)}`) }));
  sec.append(renderPosition(o));
  return sec;
}

function renderPosition(o) {
  const box = el("div", { class: "position" });
  const dist = state.validation && state.validation.available ? state.validation.outputs[o.output] : null;
  if (!o.validation || !dist) {
    box.append(el("p", { class: "hint", text: "Comparison with the cross-validated models' scores is unavailable: this model bundle does not store them (export it again with a newer stagewise)." }));
    return box;
  }
  const v = o.validation;
  const parts = [];
  if (v.below_without_outcome !== null) parts.push(`${pct(v.below_without_outcome, 0)} of those without ${outcomeText(o)}`);
  if (v.below_with_outcome !== null) parts.push(`${pct(v.below_with_outcome, 0)} of those with it`);
  box.append(el("p", { text: `Higher than ${pct(v.below, 0)} of the ${v.n} cross-validated models' scores${parts.length ? ` (${parts.join(", ")})` : ""}.` }));
  box.append(chart(dist, o));
  const legend = el("ul", { class: "legend" });
  legend.append(el("li", {}, el("span", { class: "swatch without" }), `cross-validated models' scores without ${outcomeText(o)} (above the line)`));
  legend.append(el("li", {}, el("span", { class: "swatch with" }), `with ${outcomeText(o)} (below)`));
  legend.append(el("li", {}, el("span", { class: "swatch me" }), "this image"));
  legend.append(el("li", {}, el("span", { class: "swatch thr" }), "threshold"));
  box.append(legend);
  return box;
}

function chart(dist, o) {
  const W = 520, H = 124, left = 8, right = 8, mid = 52, top = 6, bottom = 98, bins = 40;
  const values = dist.probability;
  let lo = Math.min(o.probability, o.threshold, ...values);
  let hi = Math.max(o.probability, o.threshold, ...values);
  const pad = Math.max(0.01, (hi - lo) * 0.06);
  lo = Math.max(0, lo - pad); hi = Math.min(1, hi + pad);
  if (hi - lo < 1e-6) { lo = Math.max(0, lo - 0.05); hi = Math.min(1, hi + 0.05); }
  const x = (p) => left + ((p - lo) / (hi - lo)) * (W - left - right);
  const counts = [new Array(bins).fill(0), new Array(bins).fill(0)];
  values.forEach((p, i) => {
    const b = Math.min(bins - 1, Math.max(0, Math.floor(((p - lo) / (hi - lo)) * bins)));
    counts[dist.label[i] ? 1 : 0][b] += 1;
  });
  const most = Math.max(1, ...counts[0], ...counts[1]);
  const label = `Histogram of the cross-validated models' scores: this image at ${pct(o.probability)}, threshold ${pct(o.threshold)}`;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  const bw = (W - left - right) / bins;
  for (let b = 0; b < bins; b++) {
    const h0 = (counts[0][b] / most) * (mid - top), h1 = (counts[1][b] / most) * (bottom - mid - 14);
    if (h0) root.append(svg("rect", { x: left + b * bw + 0.5, y: mid - h0, width: Math.max(1, bw - 1), height: h0, class: "bar-without" }));
    if (h1) root.append(svg("rect", { x: left + b * bw + 0.5, y: mid, width: Math.max(1, bw - 1), height: h1, class: "bar-with" }));
  }
  root.append(svg("line", { x1: left, x2: W - right, y1: mid, y2: mid, class: "axis" }));
  root.append(svg("line", { x1: x(o.threshold), x2: x(o.threshold), y1: top, y2: bottom - 10, class: "threshold" }));
  root.append(svg("line", { x1: x(o.probability), x2: x(o.probability), y1: Math.max(0, top - 4), y2: bottom - 8, class: "me" }));
  const tick = (p, anchor) => {
    const t = svg("text", { x: x(p), y: H - 4, "text-anchor": anchor });
    t.textContent = pct(p, hi - lo < 0.05 ? 2 : 0);
    root.append(t);
  };
  tick(lo, "start");
  tick((lo + hi) / 2, "middle");
  tick(hi, "end");
  return root;
}

// ---------------------------------------------------------------- CSV
function csvCell(v) {
  let s = v === null || v === undefined ? "" : String(v);
  if (/^[=+\-@\t\r]/.test(s)) s = "'" + s; // a spreadsheet must not run a file name as a formula
  return /[",\n\r]/.test(s) ? `"${s.replaceAll('"', '""')}"` : s;
}

function downloadCsv() {
  const outputs = state.card ? state.card.outputs.map((o) => o.output) : [];
  const header = ["image"];
  for (const o of outputs) header.push(`probability:${o}`, `decision:${o}`, `threshold:${o}`, `validation_below:${o}`);
  header.push("error");
  const lines = [header.map(csvCell).join(",")];
  for (const r of state.rows) {
    const cells = [r.file];
    for (const name of outputs) {
      const o = r.outputs ? r.outputs.find((x) => x.output === name) : null;
      cells.push(o ? o.probability : "", o ? (o.decision ? 1 : 0) : "", o ? o.threshold : "",
        o && o.validation ? o.validation.below : "");
    }
    cells.push(r.error);
    lines.push(cells.map(csvCell).join(","));
  }
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "stagewise-scores.csv" });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 0);
}

// ---------------------------------------------------------------- wiring
document.addEventListener("DOMContentLoaded", () => {
  loadCard();
  const input = $("#files");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  // a file dropped beside the zone must not make the browser navigate away from the results
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#download").addEventListener("click", downloadCsv);
  $("#clear").addEventListener("click", () => {
    state.rows = [];
    $("#results").replaceChildren();
    setStatus("Results cleared.");
    $("#intake").focus();
  });
});
