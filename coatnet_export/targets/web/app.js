// CoAtNet in the browser: decode an image to raw RGB pixels at its natural size and run the
// e2e model (preprocessing is inside the graph) with onnxruntime-web's WebAssembly backend.
//
// Test hooks: #status[data-state] is loading | ready | running | done | error and
// #status[data-run] counts finished runs (errors included); each #results li carries
// data-index, data-label and data-probability, and #results carries data-image and
// data-model (the image and model kind it ranks); #latency carries data-first-ms, data-warm-ms.

const TOP_K = 5;
const params = new URLSearchParams(location.search);
const WARM_RUNS = Math.max(0, Number(params.get("warm") ?? 3));
const $ = (id) => document.getElementById(id);

const state = {
  config: null,
  ort: null,
  session: null,
  kind: null,
  firstMs: null,
  runs: 0,
  image: null, // {rgb, width, height, name}
  queue: Promise.resolve(),
};

main().catch((err) => showError(`The page could not start: ${message(err)}`));

async function main() {
  state.config = await fetchJson("config.json");
  showAbout(state.config);
  state.ort = await loadRuntime(state.config.runtime);
  fillModelChoice(state.config);
  wireInputs();
  await enqueue(() => loadModel(state.config.default));
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function loadRuntime(runtime) {
  const base = new URL(runtime.base, location.href).href;
  const ort = await import(base + runtime.script);
  ort.env.wasm.wasmPaths = base;
  ort.env.logLevel = "error"; // warnings about the graph are for developers, not visitors
  ort.env.wasm.numThreads = threadCount();
  const version = ort.env.versions?.web ?? runtime.version ?? "";
  $("runtime").textContent = `onnxruntime-web ${version} (WebAssembly, ${base})`;
  const isolation = self.crossOriginIsolated ? "cross-origin isolated" : "not isolated";
  $("threads").textContent = `${ort.env.wasm.numThreads} (${isolation})`;
  $("threads").dataset.threads = String(ort.env.wasm.numThreads);
  $("isolation-note").hidden = self.crossOriginIsolated;
  return ort;
}

function threadCount() {
  const asked = Number(params.get("threads"));
  if (!self.crossOriginIsolated) return 1;
  if (asked >= 1) return Math.floor(asked);
  return Math.min(navigator.hardwareConcurrency || 1, 8);
}

function fillModelChoice(config) {
  const select = $("model");
  for (const [kind, model] of Object.entries(config.models)) {
    select.append(new Option(kind, kind));
  }
  select.value = config.default;
  select.addEventListener("change", () => {
    enqueue(async () => {
      await loadModel(select.value);
      if (state.image) await classify(state.image);
    });
  });
}

async function loadModel(kind) {
  const model = state.config.models[kind];
  setStatus("loading", `Loading the ${kind} model…`);
  $("model").disabled = true;
  const response = await fetch(model.file);
  if (!response.ok) throw new Error(`${model.file}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  await state.session?.release();
  state.session = null;
  state.session = await state.ort.InferenceSession.create(bytes, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  state.kind = kind;
  state.firstMs = null;
  $("model").disabled = false;
  const name = model.file.split("/").pop();
  $("model-info").textContent = `${name}, ${formatBytes(model.bytes)}`;
  $("model-info").dataset.kind = kind;
  $("model-info").dataset.file = name;
  setStatus("ready", state.image ? "Ready." : "Ready: choose or drop an image.");
}

function wireInputs() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) enqueue(() => classifyFile(file));
    event.target.value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) enqueue(() => classifyFile(file));
  });
  if (navigator.mediaDevices?.getUserMedia && self.isSecureContext) wireCamera();
}

function wireCamera() {
  const start = $("camera-start");
  start.hidden = false;
  start.addEventListener("click", () => enqueue(startCamera));
  $("camera-snap").addEventListener("click", () => {
    const video = $("video");
    enqueue(() => classify(pixelsOf(video, video.videoWidth, video.videoHeight, "camera frame")));
  });
  $("camera-stop").addEventListener("click", stopCamera);
}

async function startCamera() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (err) {
    throw new Error(`The camera is not available: ${message(err)}`);
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  $("camera").hidden = false;
  $("drop").hidden = true;
}

function stopCamera() {
  const video = $("video");
  video.srcObject?.getTracks().forEach((track) => track.stop());
  video.srcObject = null;
  $("camera").hidden = true;
  $("drop").hidden = false;
}

// One job at a time (model loads and runs share the session); errors end up on the page.
function enqueue(job) {
  state.queue = state.queue.then(job).catch((err) => showError(message(err)));
  return state.queue;
}

async function classifyFile(file) {
  setStatus("running", `Decoding ${file.name}…`);
  let bitmap;
  try {
    // Raw pixels as stored: no colour management, no premultiplied alpha, no resizing.
    bitmap = await createImageBitmap(file, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
  } catch (err) {
    forgetImage();
    throw new Error(`${file.name} could not be decoded as an image: ${message(err)}`);
  }
  const image = pixelsOf(bitmap, bitmap.width, bitmap.height, file.name);
  bitmap.close();
  await classify(image);
}

// Draw the source at its natural size and keep R, G, B: uint8 [H, W, 3].
function pixelsOf(source, width, height, name) {
  if (!width || !height) throw new Error(`${name} has no pixels.`);
  const canvas = $("preview");
  canvas.width = width;
  canvas.height = height;
  canvas.classList.toggle("small", Math.max(width, height) < 128);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(source, 0, 0);
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i];
    rgb[j + 1] = rgba[i + 1];
    rgb[j + 2] = rgba[i + 2];
  }
  canvas.hidden = false;
  $("image-info").textContent = `${name}, ${width} × ${height} pixels`;
  return { rgb, width, height, name };
}

function forgetImage() {
  state.image = null;
  $("preview").hidden = true;
  $("image-info").textContent = "";
}

async function classify(image) {
  state.image = image;
  setStatus("running", `Classifying ${image.name}…`);
  const feeds = {
    image: new state.ort.Tensor("uint8", image.rgb, [1, image.height, image.width, 3]),
  };
  const { logits, ms } = await timedRun(feeds);
  const first = state.firstMs === null;
  if (first) state.firstMs = ms;
  const ranked = topK(softmax(logits), TOP_K);
  showResults(ranked, image.name);
  const warm = first ? [] : [ms];
  for (let i = 0; i < WARM_RUNS; i++) warm.push((await timedRun(feeds)).ms);
  showLatency(ms, median(warm));
  const best = ranked[0];
  const percent = (100 * best.probability).toFixed(1);
  finishRun("done", `${image.name}: ${state.config.labels[best.index]} (${percent} %)`);
}

async function timedRun(feeds) {
  const start = performance.now();
  const outputs = await state.session.run(feeds);
  const ms = performance.now() - start;
  return { logits: outputs[state.session.outputNames[0]].data, ms };
}

function softmax(logits) {
  const max = Math.max(...logits);
  const exps = Array.from(logits, (x) => Math.exp(x - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((x) => x / sum);
}

function topK(probabilities, k) {
  return probabilities
    .map((probability, index) => ({ index, probability }))
    .sort((a, b) => b.probability - a.probability)
    .slice(0, k);
}

function median(values) {
  if (values.length === 0) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function showResults(ranked, imageName) {
  $("error").hidden = true;
  const list = $("results");
  list.dataset.image = imageName;
  list.dataset.model = state.kind;
  list.replaceChildren(
    ...ranked.map(({ index, probability }) => {
      const label = state.config.labels[index] ?? String(index);
      const item = document.createElement("li");
      item.dataset.index = String(index);
      item.dataset.label = label;
      item.dataset.probability = String(probability);
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = `${(100 * probability).toFixed(1)} %`;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.setProperty("--p", probability.toFixed(4));
      item.append(name, value, bar);
      return item;
    }),
  );
}

function showLatency(lastMs, warmMs) {
  const latency = $("latency");
  latency.dataset.firstMs = state.firstMs.toFixed(2);
  latency.dataset.lastMs = lastMs.toFixed(2);
  const parts = [`first run ${state.firstMs.toFixed(1)} ms`];
  if (warmMs !== null) {
    latency.dataset.warmMs = warmMs.toFixed(2);
    parts.push(`warm ${warmMs.toFixed(1)} ms (median)`);
  } else {
    delete latency.dataset.warmMs;
  }
  latency.textContent = parts.join(" · ");
}

function showError(text) {
  const list = $("results");
  list.replaceChildren();
  delete list.dataset.image;
  delete list.dataset.model;
  $("error").textContent = text;
  $("error").hidden = false;
  $("model").disabled = !state.session;
  finishRun("error", "No result.");
}

function setStatus(stateName, text) {
  const status = $("status");
  status.dataset.state = stateName;
  status.textContent = text;
}

function finishRun(stateName, text) {
  state.runs += 1;
  $("status").dataset.run = String(state.runs);
  setStatus(stateName, text);
}

function showAbout(config) {
  const meta = config.metadata;
  $("variant").textContent = meta.variant;
  const [h, w] = meta.img_size;
  $("about").textContent =
    `${meta.variant}: ${meta.num_classes} classes, ${h} × ${w} input; the model itself ` +
    `resizes (${meta.interpolation}, ${meta.crop_mode ?? "center"}), crops ` +
    `(crop_pct ${meta.crop_pct}) and normalises. ` +
    `Exported with coatnet-export ${meta.versions?.coatnet_export ?? ""}.`;
}

function formatBytes(bytes) {
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function message(err) {
  return err instanceof Error ? err.message : String(err);
}
