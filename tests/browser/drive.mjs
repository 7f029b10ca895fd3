// Drive the web target's page in a real Chromium through playwright-core.
//
//   node tests/browser/drive.mjs plan.json > result.json
//
// plan.json: {"url", "chromium", "steps": [{"model", "images": [paths]}], "corrupt": path,
//             "screenshot": path, "camera": model kind, "timeoutMs": per wait (default 30000)};
//             every image goes through the page's own file input; with "camera", Chromium's
//             fake camera gives one frame to classify after the steps.
// Prints {"browser", "isolated", "threads", "isolationNote", "runtime", "results": [{"model",
// "image", "state", "top", "firstMs", "warmMs"}], "corrupt": {"state", "error", "results",
// "preview"}, "camera": {"state", "top", "info"}, "consoleErrors", "elsewhere": [URLs requested
// from anywhere but the site's server]}.

import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { chromium } from "playwright-core";

// Chromium as root in a container, and no calls home on a machine without internet.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
const TIMEOUT_MS = plan.timeoutMs ?? 30_000;
const CAMERA_FLAGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"];
const args = plan.camera ? [...FLAGS, ...CAMERA_FLAGS] : FLAGS;
const browser = await chromium.launch({ executablePath: plan.chromium, args });
try {
  console.log(JSON.stringify(await run(browser, plan)));
} finally {
  await browser.close();
}

async function run(browser, plan) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 720 } });
  const consoleErrors = [];
  page.on("console", (msg) => msg.type() === "error" && consoleErrors.push(msg.text()));
  page.on("pageerror", (err) => consoleErrors.push(String(err)));
  const origin = new URL(plan.url).origin;
  const elsewhere = []; // requests that leave the site's server: none, so it works offline
  page.on("request", (request) => {
    const url = new URL(request.url());
    if (url.origin !== origin && !["data:", "blob:"].includes(url.protocol)) {
      elsewhere.push(request.url());
    }
  });
  await page.goto(plan.url);
  await page.waitForSelector("#status[data-state=ready]", { timeout: TIMEOUT_MS });
  const results = [];
  for (const step of plan.steps) {
    await chooseModel(page, step.model);
    for (const image of step.images) {
      results.push({ model: step.model, image, ...(await classify(page, image, step.model)) });
    }
  }
  if (plan.screenshot) await page.screenshot({ path: plan.screenshot, fullPage: true });
  const corrupt = plan.corrupt ? await classifyCorrupt(page, plan.corrupt) : null;
  const camera = plan.camera ? await classifyCameraFrame(page, plan.camera) : null;
  return {
    browser: browser.version(),
    isolated: await page.evaluate(() => self.crossOriginIsolated),
    threads: Number(await page.getAttribute("#threads", "data-threads")),
    isolationNote: await page.isVisible("#isolation-note"),
    runtime: await page.textContent("#runtime"),
    results,
    corrupt,
    camera,
    consoleErrors,
    elsewhere,
  };
}

async function chooseModel(page, kind) {
  if ((await page.inputValue("#model")) !== kind) await page.selectOption("#model", kind);
  await page.waitForFunction(
    (kind) => {
      const status = document.getElementById("status").dataset.state;
      const info = document.getElementById("model-info").dataset.kind;
      return info === kind && (status === "ready" || status === "done" || status === "error");
    },
    kind,
    { timeout: TIMEOUT_MS },
  );
}

async function finishedRuns(page) {
  return Number(await page.getAttribute("#status", "data-run"));
}

// Wait for a run after `before` that is about `name` (a model switch re-runs the last image).
async function waitForRun(page, before, name) {
  await page.waitForFunction(
    ({ before, name }) => {
      const status = document.getElementById("status");
      const results = document.getElementById("results");
      const finished = Number(status.dataset.run) > before;
      return finished && (status.dataset.state === "error" || results.dataset.image === name);
    },
    { before, name },
    { timeout: TIMEOUT_MS },
  );
}

async function classify(page, image, kind) {
  const before = await finishedRuns(page);
  await page.setInputFiles("#file", image);
  await waitForRun(page, before, basename(image));
  const state = await page.getAttribute("#status", "data-state");
  if (state !== "done") {
    return { state, error: await page.textContent("#error") };
  }
  const results = await page.$eval("#results", (list) => ({
    model: list.dataset.model,
    top: [...list.querySelectorAll("li")].map((li) => ({
      index: Number(li.dataset.index),
      label: li.dataset.label,
      probability: Number(li.dataset.probability),
    })),
  }));
  if (results.model !== kind) throw new Error(`ran ${results.model}, expected ${kind}`);
  const latency = await page.$eval("#latency", (el) => ({ ...el.dataset }));
  return {
    state,
    top: results.top,
    firstMs: Number(latency.firstMs),
    warmMs: latency.warmMs === undefined ? null : Number(latency.warmMs),
  };
}

async function classifyCorrupt(page, path) {
  const before = await finishedRuns(page);
  await page.setInputFiles("#file", path);
  await waitForRun(page, before, basename(path));
  return {
    state: await page.getAttribute("#status", "data-state"),
    error: (await page.isVisible("#error")) ? await page.textContent("#error") : null,
    results: await page.$$eval("#results li", (items) => items.length),
    preview: await page.isVisible("#preview"),
  };
}

async function classifyCameraFrame(page, kind) {
  await chooseModel(page, kind);
  await page.click("#camera-start");
  await page.waitForFunction(() => document.getElementById("video").videoWidth > 0, null, {
    timeout: TIMEOUT_MS,
  });
  const before = await finishedRuns(page);
  await page.click("#camera-snap");
  await waitForRun(page, before, "camera frame");
  return {
    state: await page.getAttribute("#status", "data-state"),
    top: await page.$$eval("#results li", (items) => items.length),
    info: await page.textContent("#image-info"),
  };
}
