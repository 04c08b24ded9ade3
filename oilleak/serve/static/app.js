// The oilleak page: send each dropped photo to POST /predict once (every instance, score_thr=0), then draw
// and list the instances at or above the slider's score. Moving the slider only re-filters in the page.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const state = { colours: [], results: [], threshold: 0.3 };

function apiHeaders() {
  const key = $("#key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// /classes carries the model and the colours; on a server with an API key it needs the key (401 without)
async function loadServerInfo() {
  try {
    const response = await fetch("/classes", { headers: apiHeaders() });
    if (response.status === 401) {
      $("#key-box").hidden = false;
      $("#model").textContent = "this server needs an API key: enter it above";
      return;
    }
    const info = await response.json();
    const m = info.model;
    $("#model").textContent = `${m.checkpoint} · ${m.preset} · ${m.classes.length} classes · ${m.device}`;
    state.colours = info.colours;
    setThreshold(m.score_thr);
  } catch (err) {
    $("#model").textContent = `the server does not answer (${err.message})`;
  }
}

function setThreshold(value) {
  state.threshold = Number(value);
  $("#score").value = String(value);
  $("#score-value").textContent = state.threshold.toFixed(2);
  state.results.forEach(render);
}

function handleFiles(files) {
  for (const file of files) predict(file);
}

async function predict(file) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  $(".status", card).textContent = "finding leaks…";
  $("#results").prepend(card);
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const [response, bitmap] = await Promise.all([
      fetch("/predict?score_thr=0", { method: "POST", body: form, headers: apiHeaders() }),
      createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null),
    ]);
    const answer = await response.json();
    if (!response.ok) {
      if (response.status === 401) $("#key-box").hidden = false;
      throw new Error(answer.message || `the server answered ${response.status}`);
    }
    const result = { card, answer, bitmap, name: file.name };
    state.results.push(result);
    const download = $(".download", card);
    download.disabled = false;
    download.addEventListener("click", () => saveJson(result));
    render(result);
  } catch (err) {
    card.classList.add("failed");
    $(".status", card).textContent = err.message;
  }
}

function colour(label) {
  return state.colours[label] || "#e8590c";
}

function render(result) {
  const { card, answer, bitmap } = result;
  const shown = answer.instances.filter((inst) => inst.score >= state.threshold);
  const canvas = $(".overlay", card);
  const scale = Math.min(1, 1600 / Math.max(answer.width, answer.height));
  canvas.width = Math.round(answer.width * scale);
  canvas.height = Math.round(answer.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ccc";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (bitmap) ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  shown.forEach((inst) => drawInstance(ctx, inst, scale));

  const share = leakShare(shown, canvas.width, canvas.height, scale);
  $(".status", card).textContent = `${answer.width} × ${answer.height} px`;
  $(".summary", card).textContent = shown.length
    ? `${shown.length} leak${shown.length > 1 ? "s" : ""} at score ≥ ${state.threshold.toFixed(2)}, covering ${(share * 100).toFixed(2)}% of the photo`
    : `no leak at score ≥ ${state.threshold.toFixed(2)} (${answer.instances.length} found in all)`;
  const rows = shown.map((inst, k) => {
    const tr = document.createElement("tr");
    const swatch = `<span class="swatch" style="background:${colour(inst.label)}"></span>`;
    tr.innerHTML = `<td class="num">${k + 1}</td><td>${swatch}</td><td class="num">${inst.score.toFixed(3)}</td>` +
      `<td class="num">${(inst.area_share * 100).toFixed(2)}%</td>`;
    tr.children[1].append(inst.class);
    return tr;
  });
  $(".leaks tbody", card).replaceChildren(...rows);
}

function tracePolygons(ctx, inst, scale) {
  ctx.beginPath();
  for (const polygon of inst.polygons) {
    polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x * scale, y * scale) : ctx.moveTo(x * scale, y * scale)));
    ctx.closePath();
  }
}

function drawInstance(ctx, inst, scale) {
  const c = colour(inst.label);
  tracePolygons(ctx, inst, scale);
  ctx.globalAlpha = 0.45;
  ctx.fillStyle = c;
  ctx.fill();
  ctx.globalAlpha = 1;
  ctx.strokeStyle = c;
  ctx.lineWidth = 2;
  ctx.stroke();
  const [x1, y1] = inst.box;
  const caption = `${inst.class} ${inst.score.toFixed(2)}`;
  ctx.font = "13px system-ui, sans-serif";
  const width = ctx.measureText(caption).width + 6;
  ctx.fillStyle = c;
  ctx.fillRect(x1 * scale, Math.max(0, y1 * scale - 16), width, 16);
  ctx.fillStyle = "#fff";
  ctx.fillText(caption, x1 * scale + 3, Math.max(12, y1 * scale - 4));
}

// The share of the photo the shown instances cover together (overlaps counted once), from their outlines.
function leakShare(shown, width, height, scale) {
  if (!shown.length) return 0;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  shown.forEach((inst) => { tracePolygons(ctx, inst, scale); ctx.fill(); });
  const alpha = ctx.getImageData(0, 0, width, height).data;
  let covered = 0;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i] > 127) covered++;
  return covered / (width * height);
}

function saveJson(result) {
  const blob = new Blob([JSON.stringify(result.answer, null, 1)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = result.name.replace(/\.[^.]*$/, "") + ".json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const drop = $("#drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });
$("#files").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
$("#score").addEventListener("input", (e) => setThreshold(e.target.value));
$("#key").addEventListener("change", loadServerInfo);
loadServerInfo();
