// The teaserve playground: a form over the OpenAI-compatible API of the server that serves this page.
// Everything the server or a user sends is shown with textContent or as an image source, never as markup.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "teaserve.apiKey";
/** The difference image shows |uncached - cached| times this, so that small differences are visible. */
const DIFF_GAIN = 4;
const POLL_MS = 500;

let servedModel = null;

class ApiError extends Error {}

// -- the API ---------------------------------------------------------------------------------------------------
function withKey(headers = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

/** The message of an OpenAI-shaped error body, else the status line. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body?.error?.message === "string") return body.error.message;
  } catch {
    // not JSON: fall back to the status
  }
  return `${response.status} ${response.statusText}`.trim();
}

async function api(path, init = {}) {
  const response = await fetch(path, { ...init, headers: withKey(init.headers) });
  if (!response.ok) throw new ApiError(await errorMessage(response));
  return response;
}

/** JSON whose "seed" keeps every digit: seeds go up to 2**63 - 1, beyond a JavaScript number. */
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    key === "seed" && typeof value === "number" && context?.source ? context.source : value,
  );
}

/** Digits as the integer they spell, every digit kept where the browser can; anything else as text, which the
 * server refuses with a message naming the seed. */
function seedValue(text) {
  if (!/^[0-9]+$/.test(text)) return text;
  return typeof JSON.rawJSON === "function" ? JSON.rawJSON(text) : Number(text);
}

/** The events of a server-sent-event stream, parsed as JSON (EventSource cannot POST, hence fetch). */
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data && data !== "[DONE]") yield parseJson(data);
    }
  }
}

// -- the form --------------------------------------------------------------------------------------------------
function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function text(id) {
  return $(id).value.trim();
}

function number(id) {
  const value = text(id);
  return value === "" ? undefined : Number(value);
}

/** The sampling fields of the form; blank fields are left to the model. */
function samplingFields() {
  const fields = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value || undefined,
    size: text("size") || undefined,
    num_inference_steps: number("steps"),
    seed: text("seed") || undefined,
    true_cfg_scale: number("true-cfg-scale"),
    guidance_scale: number("guidance-scale"),
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function cacheConfig() {
  const config = { enabled: $("cache-enabled").checked };
  for (const input of $("cache-settings").querySelectorAll("input")) {
    if (input.value.trim() !== "") config[input.dataset.key] = Number(input.value);
  }
  return config;
}

function cacheRuns() {
  return servedModel !== null && servedModel.cache.backend !== "none";
}

/** The JSON body of a request: the seed, when given, as the integer it spells. */
function jsonBody(fields) {
  const body = { ...fields };
  if (body.seed !== undefined) body.seed = seedValue(body.seed);
  return JSON.stringify(body);
}

function editForm(fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  for (const file of pickedImages) form.append("image[]", file, file.name);
  const mask = $("mask").files[0];
  if (mask) form.append("mask", mask, mask.name);
  return form;
}

// -- images: one streamed request ------------------------------------------------------------------------------
/** Run one image request over the stream; `onEvent` sees every event; resolves with the completed one. */
async function streamImage(fields, onEvent) {
  const streamed = { ...fields, stream: true, stream_progress: true, partial_images: number("partial-images") ?? 0 };
  const init =
    mode() === "edit"
      ? { method: "POST", body: editForm(streamed) }
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: jsonBody(streamed) };
  const path = mode() === "edit" ? "/v1/images/edits" : "/v1/images/generations";
  const response = await api(path, init);
  let completed = null;
  for await (const event of serverSentEvents(response)) {
    if (event.error) throw new ApiError(event.error.message);
    onEvent(event);
    if (event.type?.endsWith(".completed")) completed = event;
  }
  if (completed === null) throw new ApiError("the stream ended without an image");
  return completed;
}

function imageSource(event) {
  return `data:image/${event.output_format};base64,${event.b64_json}`;
}

function progressOf(label) {
  return (event) => {
    if (event.type?.endsWith(".progress")) {
      setProgress(event.step / event.num_steps, `${label}step ${event.step} of ${event.num_steps}`);
    }
  };
}

// -- output ----------------------------------------------------------------------------------------------------
function setProgress(fraction, label) {
  $("progress").value = fraction;
  $("progress-label").textContent = label;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  setProgress(0, "failed");
}

function element(tag, className, content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

function fillDetails(list, entries) {
  list.replaceChildren();
  for (const [term, value] of entries) {
    if (value === undefined || value === null) continue;
    list.append(element("dt", "", term), element("dd", "", String(value)));
  }
}

function seconds(value) {
  return `${Number(value).toFixed(3)} s`;
}

/** The cache schedule: one row of computed (C) and skipped (S) steps per CFG branch. */
function drawSkipStrip(container, cache, caption = "") {
  container.replaceChildren();
  if (caption) container.append(element("p", "strip-caption", caption));
  const branches = Object.entries(cache?.branches ?? {});
  if (branches.length === 0) {
    container.append(element("p", "hint", "no cache schedule for this request"));
    return;
  }
  for (const [name, branch] of branches) {
    const row = element("div", "strip-row");
    row.dataset.branch = name;
    row.append(element("span", "strip-label", `${name}: ${branch.computed_steps} computed, ${branch.skipped_steps} skipped`));
    const cells = element("div", "strip-cells");
    [...(branch.schedule ?? "")].forEach((mark, index) => {
      const skipped = mark === "S";
      const cell = element("span", skipped ? "step skipped" : "step computed");
      cell.title = `step ${index + 1}: ${skipped ? "skipped" : "computed"}`;
      cells.append(cell);
    });
    row.append(cells);
    container.append(row);
  }
}

function cacheSummary(cache) {
  if (!cache) return "no cache statistics";
  if (cache.enabled === false) return `${cache.backend} off: every step computed`;
  return `${cache.backend}: ${cache.computed_steps} computed, ${cache.skipped_steps} skipped`;
}

function showImageResult(event, wallSeconds) {
  $("final-image").src = imageSource(event);
  const cache = event.cache;
  const tuningKey = servedModel.cache.tuning_key;
  fillDetails($("result-details"), [
    ["seed", event.seed],
    ["size", event.size],
    ["server time", seconds(event.metrics.seconds)],
    ["queue time", seconds(event.metrics.queue_seconds)],
    ["round trip", seconds(wallSeconds)],
    ["steps", event.metrics.steps],
    ["cache", cacheSummary(cache)],
    ["tuning", tuningKey in (cache ?? {}) ? `${tuningKey} ${cache[tuningKey]}` : null],
    ["quality target", cache?.quality ? `${cache.quality.target_db} dB` : null],
  ]);
  drawSkipStrip($("skip-strip"), cache);
}

function resetOutput(shown) {
  $("error").hidden = true;
  for (const id of ["single-result", "compare-result", "video-result"]) $(id).hidden = id !== shown;
}

// -- actions ---------------------------------------------------------------------------------------------------
async function generate() {
  resetOutput("single-result");
  $("previews").replaceChildren();
  $("event-log").replaceChildren();
  $("final-image").removeAttribute("src");
  $("result-details").replaceChildren();
  $("skip-strip").replaceChildren();
  setProgress(0, "queued");
  const started = performance.now();
  const fields = { ...samplingFields() };
  if (cacheRuns()) fields.cache_config = cacheConfig();
  const showProgress = progressOf("");
  const completed = await streamImage(fields, (event) => {
    showProgress(event);
    if (event.type?.endsWith(".partial_image")) {
      const preview = element("img", "preview");
      preview.alt = `preview ${event.partial_image_index + 1}`;
      preview.src = imageSource(event);
      $("previews").append(preview);
      $("event-log").append(element("li", "", `partial image ${event.partial_image_index + 1}`));
    } else if (event.type?.endsWith(".completed")) {
      $("event-log").append(element("li", "", "final image"));
    }
  });
  showImageResult(completed, (performance.now() - started) / 1000);
  setProgress(1, "done");
}

async function pixelsOf(source) {
  const image = new Image();
  image.src = source;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

/** PSNR (dB, over R, G and B) of `cached` against `reference`, and their difference image. */
function psnrAndDifference(reference, cached) {
  const difference = new ImageData(reference.width, reference.height);
  let squared = 0;
  for (let i = 0; i < reference.data.length; i += 4) {
    for (let channel = 0; channel < 3; channel++) {
      const delta = reference.data[i + channel] - cached.data[i + channel];
      squared += delta * delta;
      difference.data[i + channel] = Math.min(255, Math.abs(delta) * DIFF_GAIN);
    }
    difference.data[i + 3] = 255;
  }
  const mse = squared / ((reference.data.length / 4) * 3);
  return { psnr: mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse), difference };
}

async function compare() {
  if (!cacheRuns()) throw new ApiError("this model runs without a step cache: there is nothing to compare");
  resetOutput("compare-result");
  for (const id of ["compare-uncached", "compare-cached"]) $(id).removeAttribute("src");
  $("compare-details").replaceChildren();
  $("compare-strip").replaceChildren();
  const fields = samplingFields();
  // One seed for both runs, so that the cache is the only difference.
  fields.seed ??= String(Math.floor(Math.random() * 2 ** 32));
  setProgress(0, "uncached: queued");
  const uncached = await streamImage({ ...fields, cache_config: { enabled: false } }, progressOf("uncached: "));
  $("compare-uncached").src = imageSource(uncached);
  setProgress(0, "cached: queued");
  const cached = await streamImage({ ...fields, cache_config: { ...cacheConfig(), enabled: true } }, progressOf("cached: "));
  $("compare-cached").src = imageSource(cached);
  const [reference, candidate] = await Promise.all([pixelsOf(imageSource(uncached)), pixelsOf(imageSource(cached))]);
  const { psnr, difference } = psnrAndDifference(reference, candidate);
  const canvas = $("compare-diff");
  canvas.width = difference.width;
  canvas.height = difference.height;
  canvas.getContext("2d").putImageData(difference, 0, 0);
  $("compare-uncached-caption").textContent = `uncached: ${seconds(uncached.metrics.seconds)}`;
  $("compare-cached-caption").textContent = `cached: ${seconds(cached.metrics.seconds)}`;
  $("compare-diff-caption").textContent = `|uncached − cached| × ${DIFF_GAIN}`;
  fillDetails($("compare-details"), [
    ["seed", cached.seed],
    ["speedup", `${(uncached.metrics.seconds / cached.metrics.seconds).toFixed(2)}×`],
    ["PSNR", Number.isFinite(psnr) ? `${psnr.toFixed(2)} dB` : "∞ (identical)"],
    ["uncached", cacheSummary(uncached.cache)],
    ["cached", cacheSummary(cached.cache)],
  ]);
  drawSkipStrip($("compare-strip"), cached.cache, "cached run");
  setProgress(1, "done");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function makeVideo() {
  resetOutput("video-result");
  $("video").removeAttribute("src");
  $("video-details").replaceChildren();
  const fields = { ...samplingFields(), num_frames: number("num-frames"), fps: number("fps") };
  for (const name of ["num_frames", "fps"]) if (fields[name] === undefined) delete fields[name];
  if (cacheRuns()) fields.cache_config = cacheConfig();
  const headers = { "Content-Type": "application/json" };
  let video = parseJson(await (await api("/v1/videos", { method: "POST", headers, body: jsonBody(fields) })).text());
  while (video.status === "queued" || video.status === "in_progress") {
    setProgress(video.progress / 100, `${video.status.replace("_", " ")}: ${video.progress}%`);
    await sleep(POLL_MS);
    video = parseJson(await (await api(`/v1/videos/${encodeURIComponent(video.id)}`)).text());
  }
  if (video.status !== "completed") throw new ApiError(video.error?.message ?? `the video ${video.status}`);
  const content = await api(`/v1/videos/${encodeURIComponent(video.id)}/content?variant=video`);
  const player = $("video");
  const previous = player.src;
  const loaded = new Promise((resolve, reject) => {
    player.addEventListener("loadedmetadata", resolve, { once: true });
    player.addEventListener("error", () => reject(new ApiError("this browser cannot play the MP4 the server made")), {
      once: true,
    });
  });
  player.src = URL.createObjectURL(await content.blob());
  if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
  await loaded;
  fillDetails($("video-details"), [
    ["id", video.id],
    ["seed", video.seed],
    ["size", video.size],
    ["frames", `${video.num_frames} at ${video.fps} fps`],
    ["length", `${player.duration.toFixed(2)} s`],
  ]);
  setProgress(1, "done");
}

let busy = false;

async function run(action) {
  if (busy) return;
  busy = true;
  for (const id of ["run", "compare"]) $(id).disabled = true;
  try {
    await action();
  } catch (error) {
    showError(error instanceof ApiError ? error.message : `the request failed: ${error.message}`);
  } finally {
    busy = false;
    updateMode();
  }
}

// -- edit inputs -----------------------------------------------------------------------------------------------
let pickedImages = [];

function showPickedImages() {
  const list = $("image-list");
  for (const image of list.querySelectorAll("img")) URL.revokeObjectURL(image.src);
  list.replaceChildren();
  pickedImages.forEach((file, index) => {
    const item = element("li");
    const thumbnail = element("img", "thumbnail");
    thumbnail.alt = file.name;
    thumbnail.src = URL.createObjectURL(file);
    const remove = element("button", "", "remove");
    remove.type = "button";
    remove.addEventListener("click", () => {
      pickedImages.splice(index, 1);
      showPickedImages();
    });
    item.append(thumbnail, element("span", "", file.name), remove);
    list.append(item);
  });
}

function addImages(files) {
  pickedImages = [...pickedImages, ...[...files].filter((file) => file.type.startsWith("image/"))];
  showPickedImages();
}

// -- the served model ------------------------------------------------------------------------------------------
/** What a cache knob left blank means for the request. */
function knobPlaceholder(cache, key) {
  if (key === "quality_target") return cache.quality_target === null ? "none" : String(cache.quality_target);
  if (key === cache.tuning_key && cache.quality_target !== null) return `chosen for ${cache.quality_target} dB`;
  const fallback = cache.defaults[key];
  return fallback === null || fallback === undefined ? "server default" : String(fallback);
}

function showCacheKnobs(cache) {
  $("cache-backend").textContent = cache.backend;
  const settings = $("cache-settings");
  settings.replaceChildren();
  const tunable = cache.backend !== "none";
  $("cache-enabled").disabled = !tunable;
  $("cache-enabled").checked = tunable;
  for (const key of cache.request_keys) {
    if (key === "enabled") continue;
    const label = element("label", "", key + " ");
    const input = element("input");
    input.type = "number";
    input.step = "any";
    input.id = `cache-${key}`;
    input.dataset.key = key;
    input.placeholder = knobPlaceholder(cache, key);
    label.append(input);
    settings.append(label);
  }
  const hints = [];
  if (!tunable) hints.push("This model runs without a step cache (start the server with --cache-backend to tune one).");
  if (cache.tuning_key) hints.push(`${cache.tuning_key}: larger is faster.`);
  if (cache.request_keys.includes("quality_target")) {
    hints.push(`quality_target: the mean PSNR (dB) against uncached that chooses ${cache.tuning_key}; give one or the other.`);
  }
  if (cache.quality_target !== null) hints.push(`Left blank, the server's target of ${cache.quality_target} dB chooses it.`);
  $("cache-hint").textContent = hints.join(" ");
}

function updateMode() {
  const current = mode();
  $("edit-inputs").hidden = current !== "edit";
  $("video-inputs").hidden = current !== "video";
  $("partial-images").closest("label").hidden = current === "video"; // the Videos API streams no previews
  // Left blank, an edit keeps the first image's size (rounded to the model's multiple).
  $("size").placeholder = current === "edit" ? "the first image's" : (servedModel?.default_size ?? "the model's");
  $("run").textContent = { generate: "Generate", edit: "Edit", video: "Make video" }[current];
  $("run").disabled = busy || servedModel === null;
  $("compare").disabled = busy || current === "video" || !cacheRuns();
}

function showModel(card) {
  servedModel = card;
  $("model-info").textContent =
    `${card.id} (${card.architecture}), default size ${card.default_size}` +
    (card.makes_video ? ", makes videos" : card.can_edit ? `, edits up to ${card.max_input_images} images` : "");
  const available = { generate: !card.makes_video, edit: !card.makes_video && card.can_edit, video: card.makes_video };
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.disabled = !available[radio.value];
    radio.closest("label").hidden = !available[radio.value];
  }
  if (!available[mode()]) document.querySelector(`input[name=mode][value=${card.makes_video ? "video" : "generate"}]`).checked = true;
  showCacheKnobs(card.cache);
  updateMode();
}

async function loadModel() {
  try {
    const models = await (await api("/v1/models")).json();
    $("error").hidden = true;
    showModel(models.data[0]);
  } catch (error) {
    servedModel = null;
    $("model-info").textContent = "The model list could not be read.";
    showError(error.message);
    updateMode();
  }
}

// -- wiring ----------------------------------------------------------------------------------------------------
function start() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadModel();
  });
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", updateMode);
  $("request-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(mode() === "video" ? makeVideo : generate);
  });
  $("compare").addEventListener("click", () => run(compare));
  $("images").addEventListener("change", () => {
    addImages($("images").files);
    $("images").value = "";
  });
  const dropZone = $("drop-zone");
  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    addImages(event.dataTransfer.files);
  });
  updateMode();
  loadModel();
}

start();
