// reme demo page: plain JavaScript, no external resources.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;  // last /api/segment answer
let picked = null;   // {x, y, segment} of the last clicked region

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "style") e.style.cssText = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const pct = (f) => (100 * f).toFixed(1) + "%";
const bar = (f) => el("span", { class: "bar", style: `width:${Math.round(120 * Math.max(0, Math.min(1, f)))}px` });

async function init() {
  try {
    const cfg = await (await fetch("api/config")).json();
    for (const s of cfg.samples) $("sample").append(el("option", { value: s }, s));
    for (const r of cfg.references) $("reference").append(el("option", { value: r }, r));
    $("reference").value = cfg.default_reference;
    $("sample").value = cfg.samples[0] || "";
    $("classes").value = cfg.default_classes;
    $("teach-label").maxLength = cfg.max_label_chars;
    await loadExamples();
    status("Ready. Choose a photo and classes, then press Segment.");
  } catch (err) {
    status("Cannot reach the reme server: " + err, true);
  }
}

async function runSegment(ev) {
  ev.preventDefault();
  const fd = new FormData();
  const file = $("image-file").files[0];
  if (file) fd.append("image", file); else fd.append("sample", $("sample").value);
  fd.append("classes", $("classes").value);
  fd.append("reference", $("reference").value);
  $("run").disabled = true;
  status("Segmenting… (proposals, embeddings, retrieval)");
  try {
    const resp = await fetch("api/segment", { method: "POST", body: fd });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    showResult(data);
    status(`Done in ${data.seconds} s: ${data.num_segments} segments. Click a region to see why it got its label.`);
  } catch (err) {
    status("Error: " + err.message, true);
  } finally {
    $("run").disabled = false;
  }
}

function showResult(d) {
  current = d;
  picked = null;
  $("teach").hidden = true;
  $("overlay").src = d.overlay;
  $("overlay").dataset.resultId = d.result_id;
  $("result-info").textContent = `${d.width}×${d.height} px${d.resized ? " (downscaled for speed)" : ""}, ` +
    `reference set "${d.reference}"`;
  const body = $("legend").querySelector("tbody");
  body.replaceChildren();
  const cover = Object.fromEntries((d.coverage || []).map((c) => [c.class, c]));
  for (const row of [...d.legend].sort((a, b) => b.fraction - a.fraction)) {
    const c = cover[row.class];
    const badge = c && !c.covered
      ? el("span", { class: "uncovered", title: c.warning }, "⚠ not in reference set") : "";
    body.append(el("tr", { "data-class": row.class, class: c && !c.covered ? "uncovered-row" : "" },
      el("td", {}, el("span", { class: "swatch", style: `background:${row.color}` })),
      el("td", {}, row.class, " ", badge), el("td", {}, pct(row.fraction)), el("td", {}, row.max_segment_score.toFixed(3))));
  }
  if (d.unlabelled_rule) {  // "none of these": left uncoloured in the overlay
    const u = d.unlabelled;
    body.append(el("tr", { "data-class": "", class: "unlabelled-row", title: "no asked class fits these regions; " +
        "the photo shows through. Click one to see why, and label it." },
      el("td", {}, el("span", { class: "swatch none" })), el("td", {}, "unlabelled"),
      el("td", {}, pct(u.fraction)), el("td", { class: "meta" }, `${u.segments} segment(s)`)));
  }
  const warnings = (d.coverage || []).filter((c) => !c.covered);
  $("coverage").replaceChildren(...warnings.map((c) => el("li", { "data-class": c.class }, el("b", {}, "⚠ "), c.warning)));
  $("coverage").hidden = warnings.length === 0;
  $("class-names").replaceChildren(...d.legend.map((row) => el("option", { value: row.class })));
  $("result").hidden = false;
  $("evidence").hidden = true;
}

async function showEvidence(ev) {
  if (!current) return;
  const img = $("overlay");
  const r = img.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) * img.naturalWidth / r.width);
  const y = Math.floor((ev.clientY - r.top) * img.naturalHeight / r.height);
  status(`Looking up evidence at (${x}, ${y})…`);
  try {
    const resp = await fetch(`api/evidence?result_id=${current.result_id}&x=${x}&y=${y}`);
    const d = await resp.json();
    if (!resp.ok) throw new Error(d.error || resp.statusText);
    renderEvidence(d);
    img.src = d.highlight;
    picked = { x, y, segment: d.segment };
    const now = d.class === null ? "unlabelled" : `"${d.class}"`;
    $("teach-info").textContent = `segment ${d.segment}, now ${now}`;
    if (d.class === null && d.unlabelled.suggest.length && !$("teach-label").value) $("teach-label").value = d.unlabelled.suggest[0];
    $("teach").hidden = !d.can_label;
    status(d.class === null
      ? `Segment ${d.segment} is unlabelled: no asked class fits it. Label it below ("Label this as"), or click another region.`
      : `Segment ${d.segment} → ${d.class}. Label it below, click another region, or Segment again.`);
  } catch (err) {
    status("Error: " + err.message, true);
  }
}

const taught_word = (n) => n.source === "example" ? "taught on" : "from";

function renderEvidence(d) {
  $("ev-title").textContent = `segment ${d.segment} → ${d.class === null ? "unlabelled" : d.class}`;
  $("ev-unlabelled").textContent = d.unlabelled ? d.unlabelled.why : "";
  $("ev-unlabelled").hidden = !d.unlabelled;
  const support = d.support === null ? "all reference segments (paper form)" : `the ${d.support} nearest reference segments`;
  $("ev-info").textContent = `${d.area} px. Eq. 1 softmax (τ1 = ${d.logit_scale}) over ${support}; ` +
    `the segments listed carry ${pct(d.covered)} of that weight.`;
  $("ev-photos").textContent = d.photos_hint || "";
  $("ev-photos").hidden = !d.photos_hint;
  const cls = $("ev-classes").querySelector("tbody");
  cls.replaceChildren();
  for (const [c, p] of d.class_scores) cls.append(el("tr", {}, el("td", {}, c), el("td", {}, p.toFixed(3)), el("td", {}, bar(p))));
  const votes = $("ev-votes").querySelector("tbody");
  votes.replaceChildren();
  for (const [lab, w, cls, a2] of d.votes) {
    votes.append(el("tr", {}, el("td", {}, lab), el("td", {}, w.toFixed(3)), el("td", {}, bar(w)),
      el("td", { class: "meta" }, `→ ${cls} (A2 ${a2.toFixed(2)})`)));
  }
  const list = $("ev-neighbours");
  list.replaceChildren();
  d.neighbours.forEach((n, i) => {
    const [bx, by, bw, bh] = n.bbox || [0, 0, 0, 0];
    const where = n.image ? `${taught_word(n)} ${n.image}, box ${bw}×${bh} at (${bx}, ${by}), stage ${n.source}` : "";
    const taught = n.source === "example";
    const tile = n.thumb ? el("img", { src: n.thumb, alt: `reference segment ${n.reference_id}`, loading: "lazy" })
      : el("span", { class: "rank-big", title: "photo not on this machine" }, `${i + 1}`);
    list.append(el("li", {}, el("div", { class: n.thumb ? "neighbour" : "neighbour nophoto" }, tile,
      el("div", {},
        el("div", {}, el("span", { class: "rank" }, `${i + 1}. `),
          el("span", { class: "ref-labels" }, n.labels.join(", ") || "(no label)"),
          taught ? el("span", { class: "taught" }, " (your example)") : ""),
        el("div", { class: "meta" }, `similarity ${n.similarity.toFixed(3)} · weight ${n.weight.toFixed(3)} · #${n.reference_id}`),
        el("div", { class: "meta" }, where)))));
  });
  $("evidence").hidden = false;
}

async function postForm(url, fields) {
  const fd = new FormData();
  for (const [k, v] of Object.entries(fields)) fd.append(k, v);
  const resp = await fetch(url, { method: "POST", body: fd });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

async function teach(ev) {
  ev.preventDefault();
  if (!current || !picked) return;
  const label = $("teach-label").value.trim();
  if (!label) { status("Type a label for the segment first.", true); return; }
  $("teach-run").disabled = true;
  status(`Adding segment ${picked.segment} as "${label}", then segmenting again…`);
  const t0 = performance.now();
  try {
    const d = await postForm("api/examples", { result_id: current.result_id, segment_id: picked.segment, label });
    $("classes").value = d.classes;
    showResult(d.result);
    renderExamples(d.examples);
    $("teach-label").value = "";
    const secs = ((performance.now() - t0) / 1000).toFixed(2);
    status(`Labelled as "${label}" (added in ${d.seconds.add} s, segmented again in ${d.seconds.segment} s; ` +
      `${secs} s in all). Click a region to check it, or undo below.`);
  } catch (err) {
    status("Error: " + err.message, true);
  } finally {
    $("teach-run").disabled = false;
  }
}

async function undo(exampleId) {
  status(exampleId === "all" ? "Removing every example…" : "Removing the example…");
  try {
    const fields = { example_id: exampleId, reference: $("reference").value };
    if (current) fields.result_id = current.result_id;
    const d = await postForm("api/examples/undo", fields);
    if (d.result) showResult(d.result);
    renderExamples(d.examples);
    status(`Removed ${d.removed} segment(s)` + (d.result ? " and segmented again." : "."));
  } catch (err) {
    status("Error: " + err.message, true);
  }
}

async function loadExamples() {
  const resp = await fetch(`api/examples?reference=${encodeURIComponent($("reference").value)}`);
  if (resp.ok) renderExamples((await resp.json()).examples);
}

function renderExamples(examples) {
  const body = $("examples").querySelector("tbody");
  body.replaceChildren();
  for (const e of examples) {
    const btn = el("button", { type: "button", class: "undo", "data-example": e.example_id }, "Undo");
    btn.addEventListener("click", () => undo(e.example_id));
    body.append(el("tr", { "data-example": e.example_id }, el("td", {}, e.label), el("td", {}, e.image),
      el("td", {}, e.rows), el("td", {}, e.added.replace("T", " ").replace("Z", "")), el("td", {}, btn)));
  }
  $("examples-box").hidden = examples.length === 0;
}

$("form").addEventListener("submit", runSegment);
$("teach").addEventListener("submit", teach);
$("undo-all").addEventListener("click", () => undo("all"));
$("reference").addEventListener("change", loadExamples);
$("overlay").addEventListener("click", showEvidence);
$("image-file").addEventListener("change", () => { if ($("image-file").files.length) $("sample").value = ""; });
init();
