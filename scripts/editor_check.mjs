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
  for (let i = 0; i < 3; i++) await page.keyboard.press("Escape"); // the first-run template browser
  await page.waitForTimeout(500);
  const loaded = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return (app.extensions || []).some((extension) => extension.name === "lora_loom.editor");
  });
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
    app.canvas.ds.scale = 1.2;
    app.canvas.ds.offset = [40, 40];
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

  // ApplyLoRA's "LoRA info" menu item, through the editor's own context menu.
  const title = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const load = app.graph.findNodesByType("LoadLoRA")[0];
    const apply = window.LiteGraph.createNode("ApplyLoRA");
    apply.pos = [load.pos[0] + load.size[0] + 60, load.pos[1]];
    app.graph.add(apply);
    load.connect(0, apply, 1);
    app.canvas.setDirty(true, true);
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([apply.pos[0] + 30, apply.pos[1] - 15]);
    const rect = app.canvas.canvas.getBoundingClientRect();
    return [rect.left + x, rect.top + y];
  });
  await page.waitForTimeout(300);
  await page.mouse.click(title[0], title[1], { button: "right" });
  const item = page.locator(".litecontextmenu .litemenu-entry", { hasText: "LoRA info" });
  const menu = await item.count();
  let toast = "";
  if (menu) {
    await item.first().click();
    await page.waitForTimeout(800);
    toast = await page.evaluate(() => [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText).join("\n"));
  }
  check("ApplyLoRA's menu has LoRA info, and it shows the upstream LoRA", menu === 1 && /rank/.test(toast), toast);
  await page.keyboard.press("Escape");

  // 2. The live chart: a short TrainLoRA workflow queued from the editor.
  const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
  const total = Number(stepsText);
  const secondSteps = 20; // a second TrainLoRA node in the same prompt: each chart gets its own node's steps
  await page.evaluate(async ([graph, steps]) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    await app.loadGraphData(graph);
    const first = app.graph.findNodesByType("TrainLoRA")[0];
    const second = window.LiteGraph.createNode("TrainLoRA");
    second.pos = [first.pos[0], first.pos[1] + first.size[1] + 80];
    app.graph.add(second);
    first.widgets.forEach((w, i) => { second.widgets[i].value = w.value; });
    second.widgets.find((w) => w.name === "steps").value = steps;
    second.widgets.find((w) => w.name === "output_name").value += "-second";
    app.graph.findNodesByType("LoadBase")[0].connect(0, second, 0);
    await app.queuePrompt(0, 1);
  }, [workflow, secondSteps]);
  await page.waitForFunction((steps) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const curves = app.graph.findNodesByType("TrainLoRA").map((n) => n.properties?.lora_loom_curve);
    return curves.length === 2 && curves.every((c, i) => c && c.points.length && c.points.at(-1)[0] >= steps[i]);
  }, [total, secondSteps], { timeout: 240000, polling: 500 });
  const both = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return app.graph.findNodesByType("TrainLoRA").map((n) => {
      const element = n.widgets.find((w) => w.name === "loss_chart").element;
      return { points: n.properties.lora_loom_curve.points.length, status: element.getAttribute("data-status") };
    });
  });
  check("two TrainLoRA nodes in one queue: each chart has its own run", both[0].points === total &&
    both[1].points === secondSteps && both[1].status.startsWith(`step ${secondSteps} / ${secondSteps}`), both);
  const result_text = await page.evaluate(() => [...document.querySelectorAll("div")].map((d) => d.textContent)
    .find((t) => /saved loras\/|steps .* final loss|final loss/i.test(t || "")) || "");
  check("TrainLoRA's result is shown on the node", /final loss|loras/.test(result_text), result_text.slice(0, 200));
  await page.waitForTimeout(1500);
  const chart = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const train = app.graph.findNodesByType("TrainLoRA")[0];
    app.canvas.ds.scale = 0.9;
    app.canvas.ds.offset = [-train.pos[0] + 420, -train.pos[1] + 20];
    app.canvas.setDirty(true, true);
    const canvas = train.widgets.find((w) => w.name === "loss_chart").element;
    const ctx = canvas.getContext("2d");
    const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
    let blue = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i + 2] > 150 && data[i + 2] > data[i] + 60) blue++;
    const status = canvas.getAttribute("data-status");
    return { width: canvas.width, height: canvas.height, blue, status, points: train.properties.lora_loom_curve.points.length,
      saved: JSON.stringify(app.graph.serialize()).includes("lora_loom_curve") };
  });
  check("chart drew the smoothed loss (blue pixels on the canvas)", chart.blue > 50, chart);
  check("every step reached the chart", chart.points >= total && chart.status.startsWith(`step ${total} / ${total}`), chart);
  check("the curve is saved with the workflow", chart.saved, "");
  const reopened = await page.evaluate(async () => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
    app.graph.clear();
    await app.loadGraphData(saved);
    const node = app.graph.findNodesByType("TrainLoRA")[0];
    return node.widgets.find((w) => w.name === "loss_chart").element.getAttribute("data-status");
  });
  check("a reopened workflow shows the last curve", reopened.startsWith(`step ${total} / ${total}`), reopened);
  await page.waitForTimeout(500);
  await page.screenshot({ path: `${shots}/editor-train-chart.png` });

  // 3. A page reload in the middle of a longer run: the chart catches up and goes on.
  const longer = JSON.parse(JSON.stringify(workflow));
  const trainNode = longer.nodes.find((n) => n.type === "TrainLoRA");
  const longSteps = 150;
  trainNode.widgets_values[4] = longSteps;
  trainNode.widgets_values[21] += "-long";
  await page.evaluate(async (graph) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    await app.loadGraphData(graph);
    await app.queuePrompt(0, 1);
  }, longer);
  await page.waitForFunction((steps) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const curve = app.graph.findNodesByType("TrainLoRA")[0]?.properties?.lora_loom_curve;
    return curve && curve.total === steps && curve.points.length >= 10;
  }, longSteps, { timeout: 120000, polling: 200 });
  const before = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    return app.graph.findNodesByType("TrainLoRA")[0].properties.lora_loom_curve.points.at(-1)[0];
  });
  await page.reload({ waitUntil: "load" });
  await page.waitForFunction(() => (window.comfyAPI?.app?.app ?? window.app)?.graph?.findNodesByType("TrainLoRA")?.length,
    null, { timeout: 120000 });
  await page.waitForFunction((steps) => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const node = app.graph.findNodesByType("TrainLoRA")[0];
    const status = node?.widgets?.find((w) => w.name === "loss_chart")?.element?.getAttribute("data-status") || "";
    return status.startsWith(`step ${steps} / ${steps}`);
  }, longSteps, { timeout: 300000, polling: 500 });
  const after = await page.evaluate(() => {
    const app = window.comfyAPI?.app?.app ?? window.app;
    const points = app.graph.findNodesByType("TrainLoRA")[0].properties.lora_loom_curve.points;
    return { first: points[0][0], last: points.at(-1)[0], count: points.length };
  });
  check("after a reload mid-run the chart has the steps from before it and every step after", before < longSteps &&
    after.first === 1 && after.last === longSteps && after.count === longSteps, { reloaded_after_step: before, ...after });
} catch (error) {
  check("the run completed", false, String(error));
  await page.screenshot({ path: resultPath.replace(/\.json$/, "") + "-failure.png" }).catch(() => {}); // not docs/
}
check("no console errors from our files", result.our_console_errors.length === 0, result.our_console_errors);
writeFileSync(resultPath, JSON.stringify(result, null, 2));
await browser.close();
process.exit(Object.values(result.checks).every((c) => c.ok) ? 0 : 1);
