// The real editor, driven by headless Chromium (playwright-core): the LoRA inspector and the live loss chart.
// Run by scripts/editor_check.py, which starts ComfyUI with the pack installed; this file only drives the page.
//
//   node scripts/editor_check.mjs <url> <lora name> <train workflow.json> <its steps> <screenshot dir> <result.json>
import { readFileSync, writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

// playwright-core from PLAYWRIGHT_CORE (its folder; editor_check.py sets it) or the usual node_modules lookup.
const where = process.env.PLAYWRIGHT_CORE;
const { chromium } = await import(where ? pathToFileURL(`${where}/index.mjs`).href : "playwright-core");

const [url, loraName, workflowPath, stepsText, shots, resultPath] = process.argv.slice(2);
const result = { checks: {}, console_errors: [], our_console_errors: [] };
const check = (name, ok, detail) => {
  result.checks[name] = { ok: Boolean(ok), detail };
  console.log(`${ok ? "ok  " : "FAIL"} ${name}: ${JSON.stringify(detail)}`);
};

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true });
const page = await browser.newPage({ viewport: { width: 1500, height: 950 } });
page.on("console", (message) => {
  if (message.type() !== "error") return;
  const where = message.location()?.url || "";
  const entry = { text: message.text(), url: where };
  result.console_errors.push(entry);
  if (/lora_loom|lora-loom/i.test(where + message.text())) result.our_console_errors.push(entry);
});
page.on("pageerror", (error) => {
  const entry = { text: String(error), url: "", stack: error.stack || "" };
  result.console_errors.push(entry);
  if (/lora_loom|lora-loom/i.test(entry.stack + entry.text)) result.our_console_errors.push(entry);
});

try {
  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => (window.comfyAPI?.app?.app ?? window.app)?.graph, null, { timeout: 120000 });
  await page.waitForTimeout(2000);
  const loaded = await page.evaluate(() =>
    [...document.querySelectorAll("script")].some((s) => s.src.includes("lora_loom")) ||
    performance.getEntriesByType("resource").some((r) => /extensions\/[^/]+\/js\/lora_loom\.js/.test(r.name)),
  );
  check("our extension is loaded", loaded, "");

  // 1. The inspector: a LoadLoRA node, a LoRA picked, its header read through the route.
  await page.evaluate(async (name) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    app.graph.clear();
    const node = window.LiteGraph.createNode("LoadLoRA");
    node.pos = [80, 80];
    app.graph.add(node);
    const widget = node.widgets.find((w) => w.name === "lora_name");
    widget.value = name;
    widget.callback?.(name);
    app.canvas.setDirty(true, true);
  }, loraName);
  await page.waitForFunction(() => {
    const box = document.querySelector(".lora-loom-inspector");
    return box && /rank/.test(box.textContent) && !/reading/.test(box.textContent);
  }, null, { timeout: 30000 });
  const inspector = await page.evaluate(() => document.querySelector(".lora-loom-inspector").innerText);
  check("inspector shows rank, alpha, modules, trigger words", /rank[\s\S]*U-Net 4/.test(inspector) &&
    /modules[\s\S]*U-Net \d+/.test(inspector) && /trigger words/.test(inspector) && /alpha/.test(inspector), inspector);
  check("inspector has the copy button", await page.locator(".lora-loom-inspector button").count() === 1, "");
  await page.screenshot({ path: `${shots}/editor-inspector.png` });

  // 2. The live chart: a short TrainLoRA workflow queued from the editor.
  const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
  await page.evaluate(async (graph) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    await app.loadGraphData(graph);
    await app.queuePrompt(0, 1);
  }, workflow);
  const total = Number(stepsText);
  await page.waitForFunction((steps) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.findNodesByType("TrainLoRA")[0];
    const curve = node?.properties?.lora_loom_curve;
    return curve && curve.points.length && curve.points.at(-1)[0] >= steps;
  }, total, { timeout: 240000, polling: 500 });
  await page.waitForTimeout(1500);
  const chart = await page.evaluate(() => {
    const canvas = document.querySelector("canvas.lora-loom-chart");
    const ctx = canvas.getContext("2d");
    const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
    let blue = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 200 && data[i] < 120 && data[i + 3] > 200) blue++;
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.findNodesByType("TrainLoRA")[0];
    return { width: canvas.width, height: canvas.height, blue, points: node.properties.lora_loom_curve.points.length,
      saved: JSON.stringify(app.graph.serialize()).includes("lora_loom_curve") };
  });
  check("chart drew the smoothed loss (blue pixels on the canvas)", chart.blue > 50, chart);
  check("every step reached the chart", chart.points >= total, chart);
  check("the curve is saved with the workflow", chart.saved, "");
  const result_text = await page.evaluate(() => [...document.querySelectorAll("div")].map((d) => d.textContent)
    .find((t) => /saved loras\/|steps .* final loss|final loss/i.test(t || "")) || "");
  check("TrainLoRA's result is shown on the node", /final loss|loras/.test(result_text), result_text.slice(0, 200));
  await page.screenshot({ path: `${shots}/editor-train-chart.png` });
} catch (error) {
  check("the run completed", false, String(error));
  await page.screenshot({ path: `${shots}/editor-failure.png` }).catch(() => {});
}
check("no console errors from our files", result.our_console_errors.length === 0, result.our_console_errors);
writeFileSync(resultPath, JSON.stringify(result, null, 2));
await browser.close();
process.exit(Object.values(result.checks).every((c) => c.ok) ? 0 : 1);
