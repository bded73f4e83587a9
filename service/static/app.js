// convserve web page: "see what the network sees". Plain ES module, no dependencies, no build step.
// Every number shown comes from the service's own API (/v1/models, classify, inspect, filters); nothing else is
// contacted, except an image URL the user asks the browser to fetch.

// The image types the server decodes: read from its OpenAPI document, whose list the server derives from the one
// table of decoded formats (service/preprocessing.py). Others are re-encoded as PNG here.
let SERVER_TYPES = new Set(["image/png"]);
const serverTypesLoaded = fetch("/openapi.json")
  .then((response) => response.json())
  .then((document) => {
    const content = document.components.requestBodies.Images.content;
    SERVER_TYPES = new Set(Object.keys(content).filter((type) => type.startsWith("image/")));
  })
  .catch(() => {}); // PNG alone still works
const MAP_TARGET_WIDTH = 256; // feature-map grids are drawn at an integer zoom close to this width (CSS px)

const KIND_NAMES = {
  input: "input", conv: "conv", relu: "ReLU", add: "add", pool: "pool", fc: "FC", softmax: "softmax",
};

const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  models: [],
  defaultModel: null,
  model: null, // name
  image: null, // {body: Blob, type: string, name: string}
  camClass: null, // null = the predicted class
  filters: new Map(), // model name → Promise of the filters response
  run: 0, // bumped by every request round; stale answers are dropped
  lastInspect: null,
};

// ---------------------------------------------------------------------------------------------------------------
// Small helpers

/** Build an element: h("div", {class: "x", dataset: {a: 1}}, "text", child, ...). */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") element.className = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (key === "style") {
      for (const [property, setting] of Object.entries(value)) element.style.setProperty(
        property.startsWith("--") ? property : property.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`), setting);
    }
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key in element && typeof value !== "string") element[key] = value;
    else element.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** A number for people: three significant digits, a real minus sign. */
function fmt(value) {
  if (value === 0) return "0";
  const size = Math.abs(value);
  const text = size >= 10000 || size < 0.001 ? value.toExponential(2) : String(Number(value.toPrecision(3)));
  return text.replace("-", "−");
}

function percent(p) {
  if (p >= 0.9995 && p < 1) return ">99.9 %";
  if (p > 0 && p < 0.001) return "<0.1 %";
  return `${(p * 100).toFixed(1)} %`;
}

const shapeText = (shape) => shape.join(" × ");

/** An error of the page itself (not the API), with a short headline. */
function titled(title, code, message) {
  const error = new Error(message);
  error.title = title;
  error.code = code;
  return error;
}

class ApiError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

// API keys: when the server answers 401, the page asks for a key and keeps it for this tab only (sessionStorage).
const KEY_STORAGE = "convserve-api-key";
let keyPrompt = null; // one prompt, shared by every request that met a 401 meanwhile

function withKey(options) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
}

/** Ask for a key; resolves to it, or to "" when the user cancels. */
function askForKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => {
      const dialog = $("#key-dialog");
      const input = $("#key-input");
      $("#key-message").textContent = message;
      input.value = "";
      dialog.addEventListener("close", () => {
        keyPrompt = null;
        const key = dialog.returnValue === "use" ? input.value.trim() : "";
        if (key) sessionStorage.setItem(KEY_STORAGE, key);
        else sessionStorage.removeItem(KEY_STORAGE);
        resolve(key);
      }, { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
  }
  return keyPrompt;
}

/** fetch() an API path; a non-2xx answer throws ApiError with the API's {"error": {"code", "message"}}. */
async function api(path, options = {}) {
  for (;;) {
    let response;
    try {
      response = await fetch(path, withKey(options));
    } catch (error) {
      throw new ApiError("network", `Could not reach the convserve server (${error.message}). Is it running?`);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (response.status === 401) {
      const had = sessionStorage.getItem(KEY_STORAGE);
      const key = await askForKey(had ? "That key was not accepted. Check it and try again."
        : "This server needs an API key. It is kept for this tab only.");
      if (key) continue;
      throw new ApiError("unauthorized", "This server needs an API key: reload the page to enter one.", 401);
    }
    if (!response.ok) {
      const detail = body && body.error;
      if (detail && typeof detail === "object") throw new ApiError(detail.code, detail.message, response.status);
      if (typeof detail === "string") throw new ApiError(`http_${response.status}`, detail, response.status);
      throw new ApiError(`http_${response.status}`, `${response.status} ${response.statusText}`.trim(),
        response.status);
    }
    if (body === null) throw new ApiError("bad_response", `${path} did not answer with JSON.`, response.status);
    return body;
  }
}

function setState(value) {
  document.body.dataset.state = value;
  document.body.setAttribute("aria-busy", value === "loading" ? "true" : "false");
}

/** An error banner (role=alert); null hides it. */
function showStatus(message) {
  const box = $("#status");
  box.replaceChildren();
  if (!message) {
    box.hidden = true;
    return;
  }
  box.append(message);
  box.hidden = false;
}

/** Progress for screen readers; sighted users get the spinner, without the layout jumping. */
function announce(text) {
  $("#live").textContent = text;
}

function showError(error) {
  const isApi = error instanceof ApiError && error.status;
  const title = error.title || (isApi ? "The request failed." : "Something went wrong.");
  const head = isApi ? `The API answered ${error.status} (${error.code}): ` : "";
  showStatus(h("span", {}, h("b", {}, title), " ", head, error.message || String(error)));
  announce("");
  document.body.dataset.errorCode = error.code || "error";
  setState("error");
}

/** Resolve once every <img> under root has decoded (so naturalWidth is set when the page says "ready"). */
async function imagesDecoded(root) {
  const images = [...root.querySelectorAll("img")].filter((img) => img.getAttribute("src"));
  await Promise.all(images.map((img) => img.decode().catch(() => {
    throw new Error(`The browser could not decode the image for ${img.alt || "a stage"}.`);
  })));
}

// ---------------------------------------------------------------------------------------------------------------
// Models

function currentModel() {
  return state.models.find((model) => model.name === state.model);
}

function modelAccuracy(model) {
  const version = (model.versions || []).find((v) => v.version === model.default_version);
  return version && version.metrics ? version.metrics.validation_accuracy : null;
}

async function loadModels() {
  const select = $("#model-select");
  try {
    const answer = await api("/v1/models");
    state.models = answer.models || [];
    state.defaultModel = answer.default_model;
  } catch (error) {
    select.replaceChildren(h("option", {}, "unavailable"));
    showError(error);
    return false;
  }
  const usable = state.models.filter((model) => model.default_version);
  select.replaceChildren(...state.models.map((model) => {
    const accuracy = modelAccuracy(model);
    const parts = [model.name];
    if (model.name === state.defaultModel) parts.push("(default)");
    if (!model.default_version) parts.push("— unavailable");
    else if (accuracy !== null && accuracy !== undefined) parts.push(`— ${(accuracy * 100).toFixed(1)} % val. acc.`);
    return h("option", { value: model.name, disabled: !model.default_version }, parts.join(" "));
  }));
  if (!usable.length) {
    showError(new ApiError("no_models", "The server has no model ready to serve."));
    return false;
  }
  const preferred = usable.find((model) => model.name === state.defaultModel) || usable[0];
  state.model = preferred.name;
  select.value = state.model;
  select.disabled = false;
  describeModel();
  return true;
}

function describeModel() {
  const model = currentModel();
  const info = $("#model-info");
  if (!model) {
    info.textContent = "";
    return;
  }
  const architecture = model.architecture || {};
  const accuracy = modelAccuracy(model);
  const facts = [`version ${model.default_version}`];
  if (architecture.parameters) facts.push(`${architecture.parameters.toLocaleString("en")} parameters`);
  if (accuracy !== null && accuracy !== undefined) facts.push(`${(accuracy * 100).toFixed(1)} % validation accuracy`);
  const checked = model.verification && model.verification.graphs[model.precision];
  if (model.precision) {
    facts.push(`${model.precision.toUpperCase()} graph` + (checked && checked.passed
      ? `, verified on this server's CPU (${(checked.measured.accuracy * 100).toFixed(1)} % on its check images)`
      : ""));
  }
  info.replaceChildren(h("span", { class: "facts" }, facts.join(" · ")),
    model.precision_reason
      ? h("span", { class: "refused", id: "precision-reason", role: "note" }, `FP32 serves: ${model.precision_reason}`)
      : null,
    architecture.description ? h("span", { class: "arch" }, architecture.description) : null);
}

// ---------------------------------------------------------------------------------------------------------------
// Getting an image: file, drop, paste, URL, sample

async function sendable(blob) {
  await serverTypesLoaded;
  if (SERVER_TYPES.has(blob.type)) return { body: blob, type: blob.type };
  if (blob.type.startsWith("image/")) {
    // A format the server does not decode (AVIF, SVG, HEIC where the browser can): re-encode it as PNG here.
    try {
      const bitmap = await createImageBitmap(blob);
      const canvas = h("canvas", { width: bitmap.width, height: bitmap.height });
      canvas.getContext("2d").drawImage(bitmap, 0, 0);
      const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
      if (png) return { body: png, type: "image/png", converted: blob.type };
    } catch {
      // fall through: let the server judge the bytes
    }
  }
  return { body: blob, type: "application/octet-stream" };
}

async function useImage(blob, name) {
  if (!blob || !blob.size) {
    showError(new Error("That image is empty."));
    return;
  }
  const payload = await sendable(blob);
  state.image = { ...payload, name };
  state.camClass = null;
  const preview = $("#source-preview");
  if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.alt = `Your image: ${name}`;
  preview.hidden = false;
  $("#drop-zone").classList.add("has-image");
  const size = blob.size >= 1024 ? `${(blob.size / 1024).toFixed(1)} KiB` : `${blob.size} B`;
  const converted = payload.converted ? ` · converted from ${payload.converted}` : "";
  $("#source-name").textContent = `${name} · ${size}${converted}`;
  await analyse();
}

async function fetchUrl(raw) {
  const text = raw.trim();
  if (!text) return;
  let url;
  try {
    url = new URL(text, location.href);
  } catch {
    showError(new Error(`"${text}" is not a URL.`));
    return;
  }
  if (!["http:", "https:", "data:", "blob:"].includes(url.protocol)) {
    showError(new Error(`Only http(s) and data: URLs can be fetched; got ${url.protocol}`));
    return;
  }
  setState("loading");
  showStatus(null);
  announce(`Your browser is fetching ${url.protocol === "data:" ? "the data: URL" : url.host}…`);
  let response;
  try {
    response = await fetch(url, { mode: "cors", credentials: "omit", referrerPolicy: "no-referrer" });
  } catch {
    showError(titled("Could not fetch that URL.", "cors", `Your browser could not read ${url.href}. Most likely ` +
      "that site does not allow other pages to read its images (CORS), or it is unreachable. " +
      "Save the image and drop the file here instead."));
    return;
  }
  if (!response.ok) {
    showError(titled("Could not fetch that URL.", "fetch",
      `${url.host} answered ${response.status} ${response.statusText} for that URL.`));
    return;
  }
  const blob = await response.blob();
  if (blob.type && !blob.type.startsWith("image/") && blob.type !== "application/octet-stream") {
    showError(titled("That is not an image.", "not_an_image", `That URL is not an image: it is ${blob.type}. ` +
      "Copy the address of the image itself (right-click the picture → Copy image address)."));
    return;
  }
  const name = url.protocol === "data:"
    ? "pasted data: URL" : decodeURIComponent(url.pathname.split("/").pop() || url.host);
  await useImage(blob, name);
}

function firstImageFile(list) {
  return [...(list || [])].find((file) => file.type.startsWith("image/") || !file.type) || null;
}

function looksLikeUrl(text) {
  return /^(https?:\/\/|data:image\/)/i.test(text.trim());
}

/** A small drawing (sky, sea, a sailing boat) made here, so the page can be tried without any file at hand. */
async function drawSample() {
  const size = 96;
  const canvas = h("canvas", { width: size, height: size });
  const g = canvas.getContext("2d");
  const sky = g.createLinearGradient(0, 0, 0, 60);
  sky.addColorStop(0, "#6fb4ff");
  sky.addColorStop(1, "#cfe8ff");
  g.fillStyle = sky;
  g.fillRect(0, 0, size, 60);
  g.fillStyle = "#1f5fa8";
  g.fillRect(0, 60, size, 36);
  g.fillStyle = "#7a3e12";
  g.beginPath();
  g.moveTo(18, 62);
  g.lineTo(78, 62);
  g.lineTo(68, 74);
  g.lineTo(28, 74);
  g.closePath();
  g.fill();
  g.fillStyle = "#3b2a1a";
  g.fillRect(47, 18, 3, 44);
  g.fillStyle = "#f8f8f2";
  g.beginPath();
  g.moveTo(51, 20);
  g.lineTo(74, 58);
  g.lineTo(51, 58);
  g.closePath();
  g.fill();
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  await useImage(blob, "drawn sample (a boat)");
}

// ---------------------------------------------------------------------------------------------------------------
// Asking the API

function imageRequest() {
  return { method: "POST", headers: { "Content-Type": state.image.type }, body: state.image.body };
}

function filtersFor(name) {
  if (!state.filters.has(name)) {
    const promise = api(`/v1/models/${encodeURIComponent(name)}/filters`);
    promise.catch(() => state.filters.delete(name)); // retry on the next round
    state.filters.set(name, promise);
  }
  return state.filters.get(name);
}

async function showFilters() {
  const run = state.run;
  const name = state.model;
  try {
    const answer = await filtersFor(name);
    if (run !== state.run) return;
    renderFilters(answer);
    await imagesDecoded($("#filters"));
  } catch (error) {
    if (run !== state.run) return;
    $("#filters-body").replaceChildren(h("p", { class: "error-text" }, `Could not load the filters: ${error.message}`));
    throw error;
  }
}

/** Classify + inspect the current image with the current model and draw everything. */
async function analyse() {
  if (!state.image || !state.model) return;
  const run = ++state.run;
  const name = state.model;
  const source = state.image.name;
  setState("loading");
  showStatus(null);
  announce(`Running ${name} on ${state.image.name}…`);
  const base = `/v1/models/${encodeURIComponent(name)}`;
  const camQuery = state.camClass ? `?class=${encodeURIComponent(state.camClass)}` : "";
  try {
    // classify is the served answer (shown as the prediction); inspect gives every stage on the way there.
    const [classified, inspected] = await Promise.all([
      api(`${base}/classify`, imageRequest()),
      api(`${base}/inspect${camQuery}`, imageRequest()),
      showFilters(),
    ]);
    if (run !== state.run) return;
    state.lastInspect = inspected;
    renderPrediction(classified);
    $("#result").dataset.source = source;
    const seen = $("#seen-input");
    seen.src = inspected.input.png;
    seen.alt = `Your image at ${inspected.input.shape.slice(1).join("×")} pixels, as ${inspected.model} sees it`;
    seen.hidden = false;
    renderPipeline(inspected);
    renderCam(inspected);
    await Promise.all([imagesDecoded($("#result")), imagesDecoded($("#pipeline")), imagesDecoded($("#cam"))]);
    if (run !== state.run) return;
    showStatus(null);
    delete document.body.dataset.errorCode;
    $("#result").dataset.run = String(run);
    announce(`${name} says ${classified.predictions[0].label}.`);
    setState("ready");
  } catch (error) {
    if (run !== state.run) return;
    clearResults(); // what was shown belongs to another image or model
    showError(error);
  }
}

function clearResults() {
  const result = $("#result");
  for (const key of ["model", "version", "source", "run"]) delete result.dataset[key];
  $("#prediction-label").textContent = "—";
  $("#prediction-confidence").textContent = "";
  $("#domain-warning").hidden = true;
  $("#probabilities").replaceChildren();
  $("#model-line").textContent = "";
  $("#seen-input").hidden = true;
  $("#seen-input").removeAttribute("src");
  $("#pipeline-flow")?.remove();
  $("#pipeline").replaceChildren(h("li", { class: "placeholder muted" }, "No result for this image."));
  delete $("#cam").dataset.available;
  $("#cam-body").replaceChildren(h("p", { class: "muted" }, "No class activation map for this image."));
}

/** Only the class activation map changes when another class is picked. */
async function changeCamClass(label) {
  if (!state.image) return;
  state.camClass = label;
  const run = ++state.run;
  setState("loading");
  try {
    const answer = await api(`/v1/models/${encodeURIComponent(state.model)}/inspect?class=${encodeURIComponent(label)}`,
      imageRequest());
    if (run !== state.run) return;
    renderCam(answer);
    await imagesDecoded($("#cam"));
    if (run !== state.run) return;
    showStatus(null);
    setState("ready");
  } catch (error) {
    if (run !== state.run) return;
    showError(error);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing the answers

function renderPrediction(classified) {
  const result = classified.predictions[0];
  const model = currentModel();
  const labels = (model && model.labels) || Object.keys(result.probabilities);
  $("#result").dataset.model = classified.model;
  $("#result").dataset.version = classified.version;
  const label = $("#prediction-label");
  label.textContent = result.label;
  label.dataset.label = result.label;
  $("#prediction-confidence").textContent = `${percent(result.confidence)} confident`;
  const warning = $("#domain-warning");
  warning.hidden = result.in_domain;
  warning.dataset.domainScore = String(result.domain_score);
  warning.textContent = result.in_domain ? "" :
    `This doesn't look like a ${listWithOr(labels)} (domain score ${fmt(result.domain_score)}, under the model's ` +
    "threshold): the bars say which label it is closest to, not that it is one.";
  $("#probabilities").replaceChildren(...labels.map((name) => {
    const p = result.probabilities[name];
    return h("div", {
      class: `prob-row${name === result.label ? " is-top" : ""}`, role: "listitem",
      dataset: { label: name, probability: String(p) }, "aria-label": `${name}: ${percent(p)}`,
    },
    h("span", { class: "prob-label" }, name),
    h("span", { class: "prob-track", "aria-hidden": "true" },
      h("span", { class: "prob-fill", style: { width: `${Math.max(p * 100, 0.4)}%` } })),
    h("span", { class: "prob-value", title: String(p) }, percent(p)));
  }));
  $("#model-line").textContent =
    `${classified.model} v${classified.version} (${classified.precision}) · calibrated probabilities from POST /classify`;
}

function listWithOr(items) {
  return items.length < 2 ? items.join("") : `${items.slice(0, -1).join(", ")} or ${items[items.length - 1]}`;
}

function integerZoom(naturalWidth, target = MAP_TARGET_WIDTH) {
  return Math.max(1, Math.round(target / naturalWidth));
}

/** Width of a grid image in px, from its metadata (so the layout is right before the image decodes). */
function gridSize(grid) {
  const [tileHeight, tileWidth] = grid.tile;
  return {
    width: grid.columns * (tileWidth + grid.gap) - grid.gap,
    height: grid.rows * (tileHeight + grid.gap) - grid.gap,
  };
}

function explain(stage, previous, index, stages, model) {
  const dims = stage.shape.length;
  const labels = (model && model.labels) || [];
  switch (stage.kind) {
    case "input":
      return "The picture centre-cropped to a square, shrunk to 32×32 pixels and normalised per colour channel: " +
        "this is all the network ever gets.";
    case "conv": {
      const inputs = previous ? previous.shape[0] : 3;
      return `Convolution: each of the ${stage.shape[0]} output maps slides one small learned filter over all ` +
        `${inputs} input maps; it lights up where that filter's pattern appears.`;
    }
    case "relu":
      return dims === 3
        ? "ReLU: negative values become 0 (black here), positive ones pass unchanged: only detected features go on."
        : "ReLU: negative values become 0, positive ones pass unchanged.";
    case "add":
      return "Residual shortcut: the maps from before the last two convs are added to what those convs made of " +
        "them, so the pair only has to learn a correction and the signal can flow past it.";
    case "pool": {
      if (dims === 1) {
        return "Global average pooling: each channel's whole map is averaged into one number — how much of that " +
          "feature the image holds, wherever it is.";
      }
      const factor = previous && previous.shape.length === 3 ? previous.shape[1] / stage.shape[1] : 2;
      return `Max pooling: keeps the largest value in each ${factor}×${factor} window, so the maps shrink ` +
        `${factor}× per side: what was found is kept, exactly where matters less.`;
    }
    case "fc": {
      let text = "Fully connected: every output is a weighted sum of all inputs plus a bias.";
      if (previous && previous.shape.length === 3) {
        const count = previous.shape.reduce((a, b) => a * b);
        text += ` The ${shapeText(previous.shape)} maps are first flattened into ${count} numbers.`;
      }
      const last = stages[index + 1] && stages[index + 1].kind === "softmax";
      if (last && stage.shape[0] === labels.length) {
        text += ` These are the logits: one score per class (${labels.join(", ")}).`;
      }
      return text;
    }
    case "softmax": {
      let text = "Softmax: e^score ÷ Σ e^scores turns the class scores into probabilities that are positive " +
        "and sum to 1.";
      if (model && model.architecture && model.architecture.tta_flip) {
        text += " Here the scores are first averaged with those of the mirrored image (test-time flip).";
      }
      return text;
    }
    default:
      return "";
  }
}

function kindBadge(kind) {
  return h("span", { class: `kind kind-${kind}` }, KIND_NAMES[kind] || kind);
}

/** A feature-map grid as an upscaled, pixelated image; hover tells the channel, click enlarges it. */
function mapFigure(title, grid, channels, note) {
  const { width, height } = gridSize(grid);
  const zoom = integerZoom(width);
  const img = h("img", {
    class: "pixelated map", src: grid.png,
    alt: `${title}: ${channels} ${title.startsWith("filters") ? "filters" : "feature maps"} in a ` +
      `${grid.rows}×${grid.columns} grid`,
    width: width * zoom, height: height * zoom, dataset: { zoom },
  });
  attachGridHover(img, grid, channels, title.startsWith("filters") ? "filter" : "channel");
  const button = h("button", {
    type: "button", class: "map-button", "aria-label": `Enlarge ${title}`,
    onclick: () => openZoom(title, grid, note),
  }, img);
  return button;
}

function attachGridHover(img, grid, count, noun) {
  const [tileHeight, tileWidth] = grid.tile;
  const { width } = gridSize(grid);
  img.addEventListener("mousemove", (event) => {
    const box = img.getBoundingClientRect();
    const scale = width / box.width;
    const x = (event.clientX - box.left) * scale;
    const y = (event.clientY - box.top) * scale;
    const column = Math.floor(x / (tileWidth + grid.gap));
    const row = Math.floor(y / (tileHeight + grid.gap));
    const inside = x - column * (tileWidth + grid.gap) < tileWidth && y - row * (tileHeight + grid.gap) < tileHeight;
    const index = row * grid.columns + column;
    if (!inside || column >= grid.columns || index >= count) {
      hideTooltip();
      return;
    }
    showTooltip(event, `${noun} ${index} of ${count} (${tileHeight}×${tileWidth})`);
  });
  img.addEventListener("mouseleave", hideTooltip);
}

/** A 1-D stage as a strip of bars around zero; each bar carries its value (data-value) and shows it on hover. */
function vectorStrip(name, values, labels) {
  const low = Math.min(0, ...values);
  const high = Math.max(0, ...values);
  const span = high - low || 1;
  const zero = ((0 - low) / span) * 100; // % from the bottom
  const dense = values.length > 48;
  const cells = values.map((value, index) => {
    const top = ((Math.max(value, 0) - low) / span) * 100;
    const bottom = ((Math.min(value, 0) - low) / span) * 100;
    const label = labels ? labels[index] : `${name}[${index}]`;
    return h("span", {
      class: `cell ${value >= 0 ? "pos" : "neg"}`, dataset: { index, value: String(value), label },
    }, h("span", {
      class: "bar", style: { bottom: `${bottom}%`, height: `${Math.max(top - bottom, value ? 1 : 0)}%` },
    }));
  });
  const strip = h("div", {
    class: `strip${dense ? " dense" : ""}`, role: "img",
    "aria-label": `${name}: ${values.length} values from ${fmt(Math.min(...values))} to ${fmt(Math.max(...values))}`,
    style: { "--zero": `${zero}%` },
  }, cells);
  strip.addEventListener("mouseover", (event) => {
    const cell = event.target.closest(".cell");
    if (!cell) return;
    showTooltip(event, `${cell.dataset.label} = ${Number(cell.dataset.value).toPrecision(5)}`);
  });
  strip.addEventListener("mousemove", (event) => {
    if (!$("#tooltip").hidden) placeTooltip(event);
  });
  strip.addEventListener("mouseleave", hideTooltip);
  if (!labels) return strip;
  return h("div", { class: "strip-wrap" }, strip,
    h("div", { class: "strip-labels", "aria-hidden": "true" }, labels.map((label) => h("span", {}, label))));
}

function softmaxList(values, labels) {
  const best = values.indexOf(Math.max(...values));
  return h("div", { class: "softmax-list" }, values.map((p, index) => h("div", {
    class: `softmax-row${index === best ? " is-top" : ""}`, dataset: { index, value: String(p), label: labels[index] },
  },
  h("span", { class: "prob-label" }, labels[index] || `class ${index}`),
  h("span", { class: "prob-track", "aria-hidden": "true" },
    h("span", { class: "prob-fill", style: { width: `${Math.max(p * 100, 0.4)}%` } })),
  h("span", { class: "prob-value" }, percent(p)))));
}

function stageCard(stage, step, body, explanation, extra = {}) {
  const id = `stage-${stage.name}`;
  return h("li", {
    class: `stage stage-${stage.kind}${extra.wide ? " wide" : ""}`, id,
    dataset: { stageName: stage.name, kind: stage.kind, shape: stage.shape.join("x") },
    "aria-labelledby": `${id}-title`,
  },
  h("header", { class: "stage-head" },
    h("span", { class: "step", "aria-hidden": "true" }, step),
    h("h3", { id: `${id}-title` }, stage.name),
    kindBadge(stage.kind)),
  h("p", { class: "shape" }, h("span", { class: "mono" }, shapeText(stage.shape)), " ",
    h("span", { class: "muted" }, extra.shapeNote || "")),
  h("div", { class: "stage-body" }, body),
  extra.range ? h("p", { class: "range mono small" }, "range", h("span", {}, fmt(extra.range[0])),
    extra.ramp ? h("span", { class: "ramp", title: "black = lowest, white = highest", "aria-hidden": "true" }) : "…",
    h("span", {}, fmt(extra.range[1]))) : null,
  h("p", { class: "explain" }, explanation));
}

function renderPipeline(inspected) {
  const model = currentModel();
  const labels = (model && model.labels) || Object.keys(inspected.prediction.probabilities);
  const input = { name: "input", kind: "input", shape: inspected.input.shape };
  const stages = [input, ...inspected.stages];
  const cards = stages.map((stage, index) => {
    const previous = index > 0 ? stages[index - 1] : null;
    let explanation = explain(stage, previous, index, stages, model);
    if (inspected.cam && stage.name === inspected.cam.stage) {
      explanation += " The class activation map (section 3) is computed from these maps.";
    }
    const step = index + 1;
    if (stage.kind === "input") {
      const img = h("img", {
        class: "pixelated map input-map", src: inspected.input.png, width: 128, height: 128,
        alt: "The input image at 32×32 pixels, as the network sees it",
      });
      return stageCard(stage, step, img, explanation, {
        shapeNote: "colour channels × height × width", range: inspected.input.range,
      });
    }
    if (stage.maps) {
      const note = `${stage.name} · ${KIND_NAMES[stage.kind] || stage.kind} · ${shapeText(stage.shape)} · range ` +
        `${fmt(stage.maps.range[0])} … ${fmt(stage.maps.range[1])} (black … white)`;
      return stageCard(stage, step, mapFigure(stage.name, stage.maps, stage.shape[0], note), explanation, {
        shapeNote: "channels × height × width", range: stage.maps.range, ramp: true,
      });
    }
    const values = stage.values || [];
    const range = values.length ? [Math.min(...values), Math.max(...values)] : null;
    if (stage.kind === "softmax") {
      return stageCard(stage, step, softmaxList(values, labels), explanation, { shapeNote: "probabilities" });
    }
    const next = stages[index + 1];
    const perClass = next && next.kind === "softmax" && values.length === labels.length;
    return stageCard(stage, step, vectorStrip(stage.name, values, perClass ? labels : null), explanation, {
      shapeNote: perClass ? "logits, one per class" : "values", range,
    });
  });
  $("#pipeline").replaceChildren(...cards);
  $("#pipeline").dataset.model = inspected.model;
  $("#pipeline-flow")?.remove();
  const flow = h("nav", { id: "pipeline-flow", class: "flow", "aria-label": "Stages in order" },
    stages.map((stage, index) => [
      index ? h("span", { class: "flow-arrow", "aria-hidden": "true" }, "→") : null,
      h("a", { class: `chip kind-${stage.kind}`, href: `#stage-${stage.name}` }, stage.name),
    ]));
  $("#pipeline").before(flow);
}

function renderCam(inspected) {
  const body = $("#cam-body");
  const cam = inspected.cam;
  const section = $("#cam");
  section.dataset.model = inspected.model;
  if (!cam) {
    section.dataset.available = "false";
    body.replaceChildren(h("p", { class: "muted" },
      `${inspected.model} has no class activation map: its fully connected head mixes all positions together, so ` +
      "there is no per-position evidence to show. Models that end in global average pooling" +
      (state.models.some((m) => m.name === "convnet" && m.default_version) ? " (like convnet)" : "") + " have one."));
    return;
  }
  section.dataset.available = "true";
  section.dataset.label = cam.label;
  const model = currentModel();
  const labels = (model && model.labels) || Object.keys(inspected.prediction.probabilities);
  const select = h("select", { id: "cam-class", onchange: (event) => changeCamClass(event.target.value) },
    labels.map((label) => h("option", { value: label, selected: label === cam.label },
      label + (label === inspected.prediction.label ? " (predicted)" : ""))));
  body.replaceChildren(
    h("div", { class: "cam-controls" }, h("label", { for: "cam-class" }, "Evidence for"), select),
    h("div", { class: "cam-images" },
      h("figure", {},
        h("img", { class: "cam-overlay", src: cam.png, width: 176, height: 176,
          alt: `Class activation map for ${cam.label} over the input image` }),
        h("figcaption", { class: "small muted" }, "over the input")),
      h("figure", {},
        h("img", { class: "cam-heatmap", src: cam.heatmap_png, width: 88, height: 88,
          alt: `Class activation map for ${cam.label} alone` }),
        h("figcaption", { class: "small muted" }, `alone · ${shapeText(cam.shape)} at ${cam.stage}`))),
    h("p", { class: "explain" },
      `Bright = strong evidence for “${cam.label}”: the final classifier applied at each of the ` +
      `${shapeText(cam.shape)} positions of “${cam.stage}” before they are averaged ` +
      `(raw range ${fmt(cam.range[0])} … ${fmt(cam.range[1])}).`));
}

function renderFilters(answer) {
  const filters = answer.filters;
  const [out, inputs, kh, kw] = answer.shape;
  const note = `${answer.stage}: ${out} filters of ${inputs}×${kh}×${kw} · weights ${fmt(filters.range[0])} … ` +
    `${fmt(filters.range[1])} (mid-grey = 0)`;
  const figure = mapFigure(`filters of ${answer.stage}`, filters, out, note);
  $("#filters").dataset.model = answer.model;
  $("#filters-body").replaceChildren(
    figure,
    h("div", { class: "filters-text" },
      h("p", {}, h("b", {}, `${out} filters`), ` of ${answer.stage}, each ${kh}×${kw} pixels over the ${inputs} `,
        inputs === 3 ? "colour channels, drawn in colour." : "input channels (averaged)."),
      h("p", { class: "explain" }, "These are learned weights, not activations: a filter responds most to image " +
        "patches that look like it. Mid-grey is 0; brighter and more saturated means a larger positive weight for " +
        "that colour, darker a negative one. Expect edges, colour blobs and stripes."),
      h("p", { class: "mono small muted" }, `weights ${fmt(filters.range[0])} … ${fmt(filters.range[1])} · ` +
        `model ${answer.model} v${answer.version}`)));
}

// ---------------------------------------------------------------------------------------------------------------
// Tooltip and zoom

function showTooltip(event, text) {
  const tip = $("#tooltip");
  tip.textContent = text;
  tip.hidden = false;
  placeTooltip(event);
}

function placeTooltip(event) {
  const tip = $("#tooltip");
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const below = event.clientY + 18;
  const y = below + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 10 : below;
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}

function hideTooltip() {
  $("#tooltip").hidden = true;
}

function openZoom(title, grid, note) {
  const dialog = $("#zoom");
  const { width, height } = gridSize(grid);
  const fit = Math.min((window.innerWidth * 0.85) / width, (window.innerHeight * 0.72) / height);
  const zoom = Math.max(1, Math.floor(fit));
  const img = $("#zoom-img");
  img.src = grid.png;
  img.width = width * zoom;
  img.height = height * zoom;
  img.alt = `${title}, enlarged`;
  $("#zoom-title").textContent = title;
  const tiles = `${grid.rows}×${grid.columns} grid of ${grid.tile[0]}×${grid.tile[1]} tiles`;
  $("#zoom-note").textContent = `${note} · ${tiles}, ` +
    `shown ${zoom}× · Esc closes`;
  dialog.showModal();
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring

function wire() {
  const zone = $("#drop-zone");
  const fileInput = $("#file-input");
  zone.addEventListener("click", () => fileInput.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      fileInput.click();
    }
  });
  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    if (file) useImage(file, file.name);
    fileInput.value = "";
  });

  // Drops anywhere on the page count (and never navigate away from it).
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const data = event.dataTransfer;
    const file = firstImageFile(data.files);
    if (file) {
      useImage(file, file.name || "dropped image");
      return;
    }
    const uri = (data.getData("text/uri-list") || data.getData("text/plain") || "").split("\n")
      .map((line) => line.trim()).find((line) => line && !line.startsWith("#"));
    if (uri) {
      $("#url-input").value = uri;
      fetchUrl(uri);
    } else {
      showError(new Error("Nothing usable was dropped: drop an image file, or an image dragged from another page."));
    }
  });

  document.addEventListener("paste", (event) => {
    const data = event.clipboardData;
    if (!data) return;
    const file = firstImageFile([...data.items].filter((item) => item.kind === "file").map((item) => item.getAsFile()));
    if (file) {
      event.preventDefault();
      useImage(file, file.name && file.name !== "image.png" ? file.name : "pasted image");
      return;
    }
    const text = data.getData("text/plain");
    const inField = event.target instanceof HTMLInputElement;
    if (!inField && text && looksLikeUrl(text)) {
      event.preventDefault();
      $("#url-input").value = text.trim();
      fetchUrl(text);
    }
  });

  $("#url-form").addEventListener("submit", (event) => {
    event.preventDefault();
    fetchUrl($("#url-input").value);
  });
  $("#sample-button").addEventListener("click", drawSample);

  $("#model-select").addEventListener("change", (event) => {
    state.model = event.target.value;
    state.camClass = null;
    describeModel();
    if (state.image) {
      analyse();
    } else {
      const run = ++state.run;
      setState("loading");
      showFilters().then(() => {
        if (run === state.run) setState("idle");
      }, (error) => {
        if (run === state.run) showError(error);
      });
    }
  });

  $("#zoom").addEventListener("click", (event) => {
    if (event.target === event.currentTarget) event.currentTarget.close(); // click on the backdrop
  });
}

async function main() {
  wire();
  setState("loading");
  if (!(await loadModels())) return;
  const run = ++state.run;
  try {
    await showFilters();
  } catch (error) {
    if (run === state.run) showError(error);
    return;
  }
  if (run === state.run) setState("idle");
}

main();
