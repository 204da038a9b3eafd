// The transferkit page: pick or drop images, each is sent to /predict on its own (so one bad file only fails its
// own card, and the server batches the concurrent requests), then shown with its label, top classes and Grad-CAM.
// A multi-label run shows every label at or above its threshold, and bars with each label's threshold marked.
"use strict";

const input = document.getElementById("files");
const drop = document.getElementById("drop");
const gradcam = document.getElementById("gradcam");
const results = document.getElementById("results");
const statusLine = document.getElementById("status");
const modelInfo = document.getElementById("model-info");

const MAX_IN_FLIGHT = 4; // enough to fill the server's batches without flooding it
const queue = [];
let inFlight = 0;
let done = 0;
let total = 0;
let maxFileBytes = Infinity;
let thresholds = null; // {label: threshold} of a multi-label run

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // textContent, never innerHTML: file names are user data
  return node;
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

async function loadModel() {
  try {
    const response = await fetch("/model");
    const info = await response.json();
    maxFileBytes = info.limits ? info.limits.max_file_bytes : Infinity;
    thresholds = info.thresholds || null;
    const kind = thresholds ? "labels, each decided by its own threshold" : "classes";
    const parts = [`${info.backbone || "model"}`, `${info.classes.length} ${kind}: ${info.classes.join(", ")}`];
    const metrics = info.metrics || {};
    if (typeof metrics.accuracy === "number") {
      parts.push(`${metrics.split || "eval"} accuracy ${percent(metrics.accuracy)}`);
    } else if (typeof metrics.mAP === "number") {
      parts.push(`${metrics.split || "eval"} mAP ${percent(metrics.mAP)}`);
    }
    modelInfo.textContent = parts.join(" · ");
  } catch (error) {
    modelInfo.textContent = "Could not load the model description.";
  }
}

function updateStatus() {
  statusLine.textContent = total ? `Classified ${done} of ${total} image${total === 1 ? "" : "s"}.` : "";
}

function addFiles(fileList) {
  for (const file of fileList) {
    const card = el("li", "card pending");
    const figure = el("figure");
    const image = el("img", "photo");
    image.src = URL.createObjectURL(file);
    image.alt = file.name;
    // HEIC and other formats the server reads but this browser cannot show: words instead of a broken picture
    image.addEventListener("error", () => image.replaceWith(el("p", "no-preview", `No preview: this browser cannot show ${file.name}`)), { once: true });
    figure.append(image);
    const body = el("div", "card-body");
    body.append(el("p", "filename", file.name), el("p", "state", "Classifying…"));
    card.append(figure, body);
    results.prepend(card);
    total += 1;
    queue.push({ file, card });
  }
  updateStatus();
  pump();
}

function pump() {
  while (inFlight < MAX_IN_FLIGHT && queue.length) {
    const job = queue.shift();
    inFlight += 1;
    classify(job.file, job.card).finally(() => {
      inFlight -= 1;
      done += 1;
      updateStatus();
      pump();
    });
  }
}

async function classify(file, card) {
  if (file.size > maxFileBytes) {
    showError(card, `${file.name}: larger than the server's limit of ${(maxFileBytes / 2 ** 20).toFixed(0)} MB`);
    return;
  }
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const response = await fetch(`/predict?top_k=3&gradcam=${gradcam.checked}`, { method: "POST", body: form });
    const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) {
      showError(card, data.error || `HTTP ${response.status}`);
      return;
    }
    showPrediction(card, data.predictions[0]);
  } catch (error) {
    showError(card, `network error: ${error.message}`);
  }
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("failed");
  card.querySelector(".state").replaceWith(el("p", "error", message));
}

function bar(entry, threshold) {
  const row = el("li", "bar-row");
  const track = el("span", "bar");
  track.setAttribute("role", "meter");
  track.setAttribute("aria-valuemin", "0");
  track.setAttribute("aria-valuemax", "100");
  track.setAttribute("aria-valuenow", (100 * entry.probability).toFixed(1));
  const name = threshold === undefined ? entry.label : `${entry.label} (threshold ${percent(threshold)})`;
  track.setAttribute("aria-label", name);
  const fill = el("span", "fill");
  fill.style.width = percent(entry.probability);
  track.append(fill);
  if (threshold !== undefined) {
    const mark = el("span", "threshold");
    mark.style.left = percent(threshold);
    mark.title = `threshold ${percent(threshold)}`;
    track.append(mark);
    if (entry.probability >= threshold) row.classList.add("on");
  }
  row.append(el("span", "bar-label", entry.label), track, el("span", "bar-value", percent(entry.probability)));
  return row;
}

// Single-label: the top class and the top-k bars. Multi-label: the chosen labels (thresholds differ per label, so
// they need not be the most probable ones), then bars for them and for the next most probable, at least 3.
function summary(prediction) {
  if (!prediction.labels) {
    const { label, probability, top } = prediction;
    return { names: [label], probability, bars: top, top: label };
  }
  const ranked = Object.entries(prediction.probabilities)
    .map(([label, probability]) => ({ label, probability }))
    .sort((a, b) => b.probability - a.probability);
  const chosen = ranked.filter((entry) => prediction.labels.includes(entry.label));
  const others = ranked.filter((entry) => !prediction.labels.includes(entry.label));
  const bars = chosen.concat(others.slice(0, Math.max(0, 3 - chosen.length)));
  return { names: prediction.labels, bars, top: ranked[0].label };
}

function showPrediction(card, prediction) {
  card.classList.remove("pending");
  const shown = summary(prediction);
  const headline = el("p", "prediction");
  if (!shown.names.length) {
    headline.append(el("span", "none", "no label above its threshold"));
  }
  shown.names.forEach((name, i) => headline.append(i ? ", " : "", el("span", "label", name)));
  if (shown.probability !== undefined) headline.append(" ", el("span", "probability", percent(shown.probability)));
  const bars = el("ul", "bars");
  bars.setAttribute("aria-label", prediction.labels ? "Labels and their thresholds" : "Top classes");
  const marks = prediction.labels && thresholds ? thresholds : {};
  for (const entry of shown.bars) bars.append(bar(entry, marks[entry.label]));
  card.querySelector(".state").replaceWith(headline, bars);
  if (prediction.gradcam_png) {
    const heat = el("img", "gradcam");
    heat.src = `data:image/png;base64,${prediction.gradcam_png}`;
    heat.alt = `Grad-CAM: the regions that made the model say ${shown.top}`;
    card.querySelector("figure").append(heat);
  }
}

input.addEventListener("change", () => {
  addFiles(input.files);
  input.value = ""; // picking the same file again must fire `change` again
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  addFiles(event.dataTransfer.files);
});
// A file dropped next to the zone must not make the browser navigate away from the page.
for (const name of ["dragover", "drop"]) {
  window.addEventListener(name, (event) => event.preventDefault());
}

loadModel();
