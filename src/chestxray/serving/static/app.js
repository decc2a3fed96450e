// The page: send each chosen file to /predict/explain, one after another, and show the answer.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("files");
const results = document.getElementById("results");
const template = document.getElementById("result-template");
const apiKey = document.getElementById("api-key"); // present only when the server requires keys
const maxUploadMb = parseFloat(drop.dataset.maxUploadMb || "10");

let queue = Promise.resolve();

function percent(p) {
  return (100 * p).toFixed(1) + "%";
}

function showError(card, message) {
  card.querySelector(".status").hidden = true;
  const error = card.querySelector(".error");
  error.textContent = message;
  error.hidden = false;
  card.classList.add("failed");
}

function renderBars(container, probabilities, predicted) {
  container.replaceChildren();
  for (const [name, p] of Object.entries(probabilities)) {
    const row = document.createElement("div");
    row.className = "bar-row" + (name === predicted ? " predicted" : "");
    row.dataset.class = name;
    const label = document.createElement("span");
    label.className = "bar-label";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "bar-track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = percent(p);
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "bar-value";
    value.textContent = percent(p);
    row.append(label, track, value);
    container.appendChild(row);
  }
}

function renderResult(card, data, originalUrl) {
  card.querySelector(".status").hidden = true;
  card.querySelector(".body").hidden = false;
  card.querySelector(".predicted-class").textContent = data.predicted_class;
  card.querySelector(".confidence").textContent = "(" + percent(data.confidence) + " confidence)";
  card.querySelector(".low-confidence").hidden = !data.low_confidence;
  if (data.low_confidence) card.classList.add("is-low-confidence");
  // An image unlike the X-rays the model was validated on is still answered, with the server's words
  // saying how it differs (textContent: the words are shown, never parsed as markup).
  const population = card.querySelector(".population-warning");
  const outside = (data.warnings || []).includes("outside_validated_population");
  population.hidden = !outside;
  population.querySelector(".population-words").textContent = outside
    ? (data.warning_messages || {}).outside_validated_population ||
      "This image is unlike the X-rays the model was validated on, so this prediction may be less reliable."
    : "";
  if (outside) card.classList.add("is-outside-population");
  renderBars(card.querySelector(".bars"), data.probabilities, data.predicted_class);

  const picture = card.querySelector(".picture");
  const toggle = card.querySelector(".overlay-toggle");
  const overlayUrl = data.gradcam_png ? "data:image/png;base64," + data.gradcam_png : null;
  toggle.disabled = !overlayUrl;
  card.querySelector(".gradcam-note").textContent =
    overlayUrl ? "(heatmap for " + data.gradcam_class + ")" : "(no heatmap available)";
  const show = () => {
    const useOverlay = Boolean(overlayUrl) && (toggle.checked || !originalUrl);
    const url = useOverlay ? overlayUrl : originalUrl;
    picture.hidden = !url;
    if (url) picture.src = url;
    picture.alt = useOverlay ? "Grad-CAM overlay on the X-ray" : "uploaded X-ray";
    card.classList.toggle("showing-overlay", useOverlay);
  };
  toggle.addEventListener("change", show);
  if (!originalUrl && overlayUrl) toggle.checked = true; // e.g. DICOM: the browser cannot show the original
  show();

  const text = card.querySelector(".explanation");
  const missing = card.querySelector(".explanation-missing");
  text.textContent = data.explanation || "";
  text.hidden = !data.explanation;
  missing.textContent = data.explanation ? "" : "No explanation: " + (data.explanation_error || "unavailable");
  missing.hidden = Boolean(data.explanation);
  card.querySelector(".meta").textContent =
    "Model " + data.model_version + " · " + data.inference_time_ms + " ms";
  card.classList.add("done");
}

async function predict(file, card) {
  card.querySelector(".status").textContent = "Analysing…";
  if (file.size > maxUploadMb * 1024 * 1024) {
    showError(card, "The file is larger than " + maxUploadMb + " MB.");
    return;
  }
  const form = new FormData();
  form.append("file", file);
  let response;
  try {
    const headers = apiKey && apiKey.value ? { "X-API-Key": apiKey.value.trim() } : {};
    response = await fetch("predict/explain", { method: "POST", body: form, headers });
  } catch (err) {
    showError(card, "Could not reach the server (" + err.message + ").");
    return;
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    showError(card, "The server answered " + response.status + " without a readable result.");
    return;
  }
  if (!response.ok) {
    const hint = response.status === 401 && apiKey ? ". Enter your API key above and try again." : "";
    showError(card, (data.message || data.error || "The server refused this file.") + hint);
    return;
  }
  const browserCanShow = /^image\/(jpeg|png)$/.test(file.type);
  renderResult(card, data, browserCanShow ? URL.createObjectURL(file) : null);
}

function addFiles(files) {
  for (const file of files) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.querySelector(".file-name").textContent = file.name;
    results.appendChild(card);
    queue = queue.then(() => predict(file, card)); // one at a time: the server has few cores
  }
}

input.addEventListener("change", () => {
  addFiles(Array.from(input.files));
  input.value = "";
});

for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("dragging"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  addFiles(Array.from(event.dataTransfer.files));
});
