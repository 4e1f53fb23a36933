// The search page: a photo (file, drop or URL), a crop box, options, then results from the
// HTTP API (POST /v1/jobs, GET /v1/jobs/{id}?wait_s=, GET /v1/products/{id}/similar).
"use strict";

const $ = (id) => document.getElementById(id);
const WAIT_S = 10;            // long-poll: seconds per GET of a job (the gateway caps it)
const TEXT_FILTERS = ["gender", "master_category", "sub_category", "article_type", "base_colour", "season", "usage"];
const CROP = ["x", "y", "w", "h"];
// The field a failed job's error code is about (the worker's codes, see the README's error list).
const JOB_ERROR_FIELDS = {crop_outside_image: "crop", corrupt: "image", too_small: "image", too_large: "image",
                          upload_expired: "image", url_refused: "image_url", url_unreachable: "image_url",
                          url_timeout: "image_url", url_status: "image_url", too_many_redirects: "image_url"};

let photo = null;             // {file} or {url}: what the next search sends
let usedBox = null;           // the box the last search of this photo used (result.box)
let busy = false;

// ---- the photo --------------------------------------------------------------------------

function showPhoto(src, source) {
  photo = source;
  usedBox = null;
  clearCrop();
  $("photo").src = src;
  $("crop-fields").hidden = false;
  clearErrors();
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (file) {
    $("image_url").value = "";
    showPhoto(URL.createObjectURL(file), {file});
  }
});

/** Show the pasted URL's photo; false (and a message) when it is not an http(s) URL. */
function useUrl() {
  const url = $("image_url").value.trim();
  if (!/^https?:\/\//i.test(url)) {
    showError({code: "invalid_image_url", field: "image_url",
               message: "the image URL must start with http:// or https://"});
    return false;
  }
  if (!photo || photo.url !== url) {
    $("image").value = "";
    showPhoto(url, {url});
  }
  return true;
}

$("show-url").addEventListener("click", useUrl);

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) {
    $("image").value = "";
    $("image_url").value = "";
    showPhoto(URL.createObjectURL(file), {file});
  }
});

$("photo").addEventListener("error", () => {
  if (photo) {
    showError({code: "unreadable", field: photo.url ? "image_url" : "image",
               message: "the browser cannot show this image; the search may still work for a URL it cannot reach"});
  }
});

// ---- the crop box: pixels of the photo, shown scaled on the page -------------------------

function cropValue() {
  const values = CROP.map((name) => $("crop-" + name).value.trim());
  if (values.every((v) => v === "")) return null;
  const box = {};
  CROP.forEach((name, i) => { box[name] = Number(values[i]); });
  return box;
}

function setCrop(box) {
  CROP.forEach((name) => { $("crop-" + name).value = box ? Math.round(box[name]) : ""; });
  drawBox();
}

function clearCrop() { setCrop(null); }

/** Show the typed or dragged box on the photo, else (dashed) the one the last search used. */
function drawBox() {
  const img = $("photo"), typed = cropValue(), box = typed || usedBox, el = $("box");
  const scale = img.clientWidth / (img.naturalWidth || 1);
  if (!box || CROP.some((name) => !Number.isFinite(box[name])) || !img.naturalWidth) {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  el.classList.toggle("used", !typed);
  el.style.left = box.x * scale + "px";
  el.style.top = box.y * scale + "px";
  el.style.width = box.w * scale + "px";
  el.style.height = box.h * scale + "px";
}

CROP.forEach((name) => $("crop-" + name).addEventListener("input", drawBox));
$("crop-clear").addEventListener("click", clearCrop);
$("photo").addEventListener("load", () => {
  CROP.forEach((name) => { $("crop-" + name).max = $("photo")[name === "x" || name === "w" ? "naturalWidth" : "naturalHeight"]; });
  drawBox();
});
window.addEventListener("resize", drawBox);

let dragFrom = null;

function photoPoint(event) {
  const img = $("photo"), rect = img.getBoundingClientRect();
  const scale = img.naturalWidth / rect.width;
  const clamp = (v, max) => Math.min(Math.max(v, 0), max);
  return {x: clamp((event.clientX - rect.left) * scale, img.naturalWidth),
          y: clamp((event.clientY - rect.top) * scale, img.naturalHeight)};
}

$("stage").addEventListener("pointerdown", (event) => {
  if (!$("photo").naturalWidth) return;
  event.preventDefault();
  dragFrom = photoPoint(event);
  $("stage").setPointerCapture(event.pointerId);
});
$("stage").addEventListener("pointermove", (event) => {
  if (!dragFrom) return;
  const to = photoPoint(event);
  const x = Math.floor(Math.min(dragFrom.x, to.x)), y = Math.floor(Math.min(dragFrom.y, to.y));
  setCrop({x, y, w: Math.max(1, Math.floor(Math.abs(to.x - dragFrom.x))),
           h: Math.max(1, Math.floor(Math.abs(to.y - dragFrom.y)))});
});
$("stage").addEventListener("pointerup", () => { dragFrom = null; });
$("stage").addEventListener("pointercancel", () => { dragFrom = null; });

// ---- options ------------------------------------------------------------------------------

$("category-level").addEventListener("change", () => {
  const level = $("category-level").value;
  $("category-value").disabled = level === "" || level === "auto";
});

function splitValues(text) {
  const values = text.split(",").map((v) => v.trim()).filter((v) => v !== "");
  return values.length === 1 ? values[0] : values;
}

/** The search options of the form, as the API names them (see /openapi.json). */
function options() {
  const filters = {};
  for (const name of TEXT_FILTERS) {
    const value = splitValues($("filter-" + name).value);
    if (value.length) filters[name] = value;
  }
  const year = {};
  for (const bound of ["gte", "lte"]) {
    const raw = $("year-" + bound).value.trim();
    if (raw !== "") year[bound] = Number(raw);
  }
  if (Object.keys(year).length) filters.year = year;
  const level = $("category-level").value;
  let category = null;
  if (level === "auto") category = "auto";
  else if (level) category = {level, value: $("category-value").value.trim()};
  return {k: Number($("k").value), crop: cropValue(), filters: Object.keys(filters).length ? filters : null,
          category};
}

// ---- talking to the API ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(detail) { super(detail.message); this.detail = detail; }
}

async function api(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError({code: "network", message: "the service cannot be reached (" + err.message + "); try again"});
  }
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON: handled below */ }
  if (!response.ok) {
    throw new ApiError(body && body.error ? body.error :
                       {code: "http_" + response.status, message: "the service answered " + response.status});
  }
  return body;
}

function submitJob(opts) {
  if (photo.file) {
    const form = new FormData();
    form.append("image", photo.file);
    form.append("k", String(opts.k));
    for (const name of ["crop", "filters"]) if (opts[name]) form.append(name, JSON.stringify(opts[name]));
    if (opts.category) form.append("category", opts.category === "auto" ? "auto" : JSON.stringify(opts.category));
    return api("/v1/jobs", {method: "POST", body: form});
  }
  const body = {image_url: photo.url, k: opts.k};
  for (const name of ["crop", "filters", "category"]) if (opts[name]) body[name] = opts[name];
  return api("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                          body: JSON.stringify(body)});
}

/** Long-poll a job until it is done; shows queued/running while it waits. */
async function waitForJob(jobId, what) {
  const start = performance.now();
  for (;;) {
    const status = await api("/v1/jobs/" + encodeURIComponent(jobId) + "?wait_s=" + WAIT_S);
    if (status.status === "done") return status;
    if (status.status === "failed") {
      const error = status.error || {code: "failed", message: "the job failed"};
      throw new ApiError({...error, field: JOB_ERROR_FIELDS[error.code]});
    }
    const seconds = ((performance.now() - start) / 1000).toFixed(0);
    setStatus(what + ": " + status.status + (status.status === "queued" ? ", waiting for a worker" : "") +
              " (" + seconds + " s)", "progress");
  }
}

function similarQuery(productId, opts) {
  const params = new URLSearchParams({k: String(opts.k), wait_s: String(WAIT_S)});
  for (const [name, value] of Object.entries(opts.filters || {})) {
    if (name === "year") {
      for (const [bound, year] of Object.entries(value)) params.append("year_" + bound, String(year));
    } else {
      for (const v of [].concat(value)) params.append(name, v);
    }
  }
  if (opts.category && opts.category !== "auto") {
    params.append("category_level", opts.category.level);
    params.append("category_value", opts.category.value);
  }
  return "/v1/products/" + productId + "/similar?" + params;
}

// ---- what the user sees -------------------------------------------------------------------

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = kind || "";
}

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  setStatus("");
}

/** Put the API's message next to the field it names (e.g. `filters.year.gte`), else in the status line. */
function showError(detail) {
  const field = (detail.field || "").replace(/^image_base64$/, "image");
  const parts = field ? field.split(".") : [];
  for (let n = parts.length; n > 0; n--) {
    const slot = $("error-" + parts.slice(0, n).join("-"));
    if (slot) {
      // "crop.w: Input should be..." reads "w: Input should be..." next to the crop fields.
      const message = detail.message.startsWith(field + ": ") ?
        parts[parts.length - 1].replace(/_/g, " ") + detail.message.slice(field.length) : detail.message;
      slot.textContent = capitalise(message);
      const details = slot.closest("details");
      if (details) details.open = true;
      const input = $(slot.dataset.for);
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", slot.id);
      setStatus("See the message at " + field.replace(/_/g, " ").replace(/\./g, " ") + " above.", "error");
      return;
    }
  }
  setStatus(capitalise(detail.message) + ".", "error");
}

function capitalise(text) { return text ? text[0].toUpperCase() + text.slice(1) : text; }

function describeBox(box) { return box.w + "×" + box.h + " px at (" + box.x + ", " + box.y + ")"; }

/** Predicted categories, if the result has them: a list of {level, value|name, probability}, or an
 * object level -> value or level -> [{value, probability}]. */
function describePredicted(predicted) {
  const one = (p) => typeof p === "string" ? p :
    (p.value || p.name || p.label || "") + ((p.prob ?? p.probability) != null ?
      " (" + Math.round((p.prob ?? p.probability) * 100) + "%)" : "");
  if (Array.isArray(predicted)) return predicted.map((p) => (p.level ? p.level.replace(/_/g, " ") + ": " : "") + one(p)).join("; ");
  return Object.entries(predicted).map(([level, p]) =>
    level.replace(/_/g, " ") + ": " + [].concat(p).slice(0, 3).map(one).join(", ")).join("; ");
}

function showResults(title, result, clickedId) {
  const used = [];
  if (result.box) used.push("Searched the crop " + describeBox(result.box) + ".");
  const predicted = result.predicted || result.categories;
  if (predicted && Object.keys(predicted).length) used.push("Predicted category: " + describePredicted(predicted) + ".");
  if (result.category) used.push("Searched within " + result.category.level.replace(/_/g, " ") + " " +
                                 result.category.value + ".");
  if (result.model_version) used.push("Model " + result.model_version + ".");
  $("used").textContent = used.join(" ");
  $("results-title").textContent = title;
  const grid = $("grid");
  grid.replaceChildren(...result.products.map(card));
  grid.dataset.excluded = clickedId || "";
  $("results").hidden = false;
  if (result.box) {
    usedBox = result.box;
    drawBox();
  }
  setStatus(result.products.length ? result.products.length + " products found." :
            "No product matches; try fewer filters.", "done");
}

function card(hit) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.productId = hit.product_id;
  const img = document.createElement("img");
  img.src = hit.image_url || "/v1/products/" + hit.product_id + "/image";
  img.alt = hit.title || "product " + hit.product_id;
  const title = document.createElement("h3");
  title.textContent = hit.title || "Product " + hit.product_id;
  const categories = document.createElement("p");
  categories.className = "categories";
  categories.textContent = [hit.gender, hit.master_category, hit.sub_category, hit.article_type, hit.base_colour]
    .filter(Boolean).join(" · ");
  const score = document.createElement("p");
  score.className = "score";
  score.textContent = "Similarity " + hit.score.toFixed(3);
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "More like this";
  more.setAttribute("aria-label", "More like " + title.textContent);
  more.addEventListener("click", () => moreLikeThis(hit));
  img.addEventListener("click", () => moreLikeThis(hit));
  li.append(img, title, categories, score, more);
  return li;
}

async function run(what, work) {
  if (busy) return;
  busy = true;
  $("go").disabled = true;
  clearErrors();
  setStatus(what + ": sending…", "progress");
  try {
    await work();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    showError(err.detail);
  } finally {
    busy = false;
    $("go").disabled = false;
  }
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  if ($("image_url").value.trim() && !useUrl()) return;
  if (!photo) {
    showError({code: "missing_image", field: "image", message: "choose a photo, drop one, or paste an image URL first"});
    return;
  }
  const opts = options();
  run("Search", async () => {
    const accepted = await submitJob(opts);
    const status = await waitForJob(accepted.job_id, "Search");
    showResults("Products like your photo", status.result, null);
    $("results-title").focus();
  });
});

function moreLikeThis(hit) {
  const opts = options();
  run("More like " + (hit.title || hit.product_id), async () => {
    let status = await api(similarQuery(hit.product_id, opts));
    if (status.status !== "done") status = await waitForJob(status.job_id, "More like this");
    showResults("More like " + (hit.title || "product " + hit.product_id), status.result, hit.product_id);
    $("results-title").focus();
  });
}
