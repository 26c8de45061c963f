// Served at /extensions/<pack folder>/js/ by the host (WEB_DIRECTORY = "./web"), hence the three "../".
// LoRA Loom in the ComfyUI editor: a live loss chart on TrainLoRA, a LoRA inspector on LoadLoRA (and "LoRA
// info" in ApplyLoRA's context menu), run results on the nodes, and the pack's node colours. The logic lives
// in loss_chart.js and inspector.js (plain modules, tested under node); this file only wires it to the editor.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { LossHistory, drawChart } from "./loss_chart.js";
import { clipboardText, infoUrl, inspectorRows } from "./inspector.js";

const OUR_NODES = ["LoadBase", "LoadLoRA", "ApplyLoRA", "FuseLoRA", "TrainLoRA", "Sampler", "LoomImageGrid"];
const COLOUR = { color: "#2a4a6a", bgcolor: "#1d3347" };
const CURVE_PROPERTY = "lora_loom_curve"; // saved with the workflow: the last curve survives a reopen
const CHART_HEIGHT = 160;

// A node's chart lives on the node (node.loraLoomChart): ids change when a saved graph is configured onto
// freshly created nodes, so a message's node id is looked up in the graph when it arrives.
function nodeById(id) {
  const graph = app.graph;
  return graph?.getNodeById(Number(id)) ?? graph?.getNodeById(id) ?? null;
}

function redraw(entry) {
  const canvas = entry.canvas;
  const width = Math.max(200, Math.floor(canvas.clientWidth || entry.node.size[0] - 20));
  if (canvas.width !== width) canvas.width = width;
  canvas.height = CHART_HEIGHT;
  const ctx = canvas.getContext("2d");
  if (ctx) drawChart(ctx, entry.history, canvas.width, canvas.height);
  canvas.setAttribute("data-status", entry.history.status()); // the step counter, for tests and screen readers
}

function addChart(node) {
  const canvas = document.createElement("canvas");
  canvas.className = "lora-loom-chart";
  canvas.style.width = "100%";
  canvas.height = CHART_HEIGHT;
  const entry = { node, history: LossHistory.fromJSON(node.properties?.[CURVE_PROPERTY]), canvas };
  node.addDOMWidget("loss_chart", "lora_loom_chart", canvas, {
    serialize: false,
    getMinHeight: () => CHART_HEIGHT,
  });
  node.loraLoomChart = entry;
  requestAnimationFrame(() => redraw(entry));
  return entry;
}

function onTrainMessage(message) {
  const entry = nodeById(message?.node)?.loraLoomChart;
  if (!entry || !entry.history.add(message)) return;
  entry.node.properties = entry.node.properties || {};
  entry.node.properties[CURVE_PROPERTY] = entry.history.toJSON();
  redraw(entry);
}

let catchingUp = null;

function catchUpSoon() {
  // Graphs restored after a reload configure their nodes one by one: one request for all of them.
  catchingUp ??= new Promise((resolve) => setTimeout(resolve, 50)).then(catchUp).finally(() => (catchingUp = null));
}

async function catchUp() {
  // After a page reload mid-run: the server keeps each TrainLoRA node's latest messages. Only those of the
  // prompt running now are replayed (node ids repeat across workflows; a finished run's curve is already
  // saved in its workflow).
  try {
    const [queue, history] = await Promise.all(
      ["/queue", "/lora_loom/train_history"].map((route) => api.fetchApi(route).then((r) => (r.ok ? r.json() : {}))),
    );
    const running = new Set((queue.queue_running || []).map((item) => item[1]));
    for (const [nodeId, messages] of Object.entries(history)) {
      const entry = nodeById(nodeId)?.loraLoomChart;
      const ours = messages.filter((message) => running.has(message.prompt_id));
      if (!entry || !ours.length) continue;
      entry.history = LossHistory.replay(ours, entry.history);
      entry.node.properties[CURVE_PROPERTY] = entry.history.toJSON();
      redraw(entry);
    }
  } catch (error) {
    console.warn("LoRA Loom: no training history", error);
  }
}

function addInspector(node) {
  const box = document.createElement("div");
  box.className = "lora-loom-inspector";
  box.style.cssText = "font: 11px sans-serif; color: #ccc; overflow: auto; padding: 2px 4px;";
  node.addDOMWidget("lora_info", "lora_loom_inspector", box, {
    serialize: false,
    getMinHeight: () => Math.max(60, box.scrollHeight + 8),
  });
  const widget = node.widgets?.find((w) => w.name === "lora_name");
  const show = async () => {
    const name = widget?.value;
    if (!name) return;
    box.textContent = "reading…";
    let info;
    try {
      const response = await api.fetchApi(infoUrl(name));
      info = await response.json();
    } catch (error) {
      info = { error: String(error) };
    }
    if (widget.value !== name) return; // picked another LoRA meanwhile: its own answer will draw
    node.loraLoomInfo = info;
    renderInspector(box, info);
    fitNode(node);
  };
  if (widget) {
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      show();
      return result;
    };
  }
  node.loraLoomShowInfo = show;
  return show;
}

function fitNode(node) {
  // Grow the node to show the whole DOM widget (never shrink what the user made larger).
  requestAnimationFrame(() => {
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width, 340), Math.max(node.size[1], height)]);
    app.graph?.setDirtyCanvas(true, true);
  });
}

function renderInspector(box, info) {
  box.replaceChildren();
  const table = document.createElement("table");
  for (const [label, text] of inspectorRows(info)) {
    const row = table.insertRow();
    const key = row.insertCell();
    key.textContent = label;
    key.style.cssText = "color: #8ab; padding-right: 6px; vertical-align: top; white-space: nowrap;";
    row.insertCell().textContent = text;
  }
  box.append(table);
  const words = clipboardText(info);
  if (words) {
    const button = document.createElement("button");
    button.textContent = "copy trigger words";
    button.onclick = () => navigator.clipboard?.writeText(words);
    box.append(button);
  }
}

function upstreamLoadLoRA(node) {
  const input = node.inputs?.find((i) => i.name === "lora");
  const link = input?.link != null ? app.graph.links[input.link] : null;
  const source = link ? app.graph.getNodeById(link.origin_id) : null;
  return source?.comfyClass === "LoadLoRA" ? source : null;
}

function addInfoMenuItem(node) {
  // On this node only (the legacy per-node hook every frontend version calls), chained to any other.
  const previous = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const result = previous?.apply(this, arguments);
    const source = upstreamLoadLoRA(node);
    options.push({
      content: "LoRA info",
      disabled: !source,
      callback: () => {
        const rows = inspectorRows(source?.loraLoomInfo);
        const text = rows.map(([label, value]) => `${label}: ${value}`).join("\n");
        app.extensionManager?.toast?.add({ severity: "info", summary: "LoRA info", detail: text, life: 8000 });
      },
    });
    return result;
  };
}

function showResult(node, lines) {
  if (!lines?.length) return;
  let widget = node.widgets?.find((w) => w.name === "lora_loom_result");
  if (!widget) {
    const box = document.createElement("div");
    box.style.cssText = "font: 11px monospace; color: #cdc; white-space: pre-wrap; padding: 2px 4px;";
    widget = node.addDOMWidget("lora_loom_result", "lora_loom_result", box, { serialize: false });
  }
  widget.element.textContent = lines.join("\n");
  fitNode(node);
}

app.registerExtension({
  name: "lora_loom.editor",

  async setup() {
    api.addEventListener("lora_loom.train", (event) => onTrainMessage(event.detail));
    api.addEventListener("executed", (event) => {
      const { node: nodeId, output } = event.detail || {};
      const node = nodeById(nodeId);
      if (node && OUR_NODES.includes(node.comfyClass) && Array.isArray(output?.text)) showResult(node, output.text);
    });
    await catchUp();
  },

  nodeCreated(node) {
    if (!OUR_NODES.includes(node.comfyClass)) return;
    Object.assign(node, COLOUR);
    if (node.comfyClass === "TrainLoRA") addChart(node);
    if (node.comfyClass === "LoadLoRA") addInspector(node)();
    if (node.comfyClass === "ApplyLoRA") addInfoMenuItem(node);
  },

  loadedGraphNode(node) {
    // A workflow opened from file or restored: the saved curve, and the inspector for the saved LoRA.
    if (node.comfyClass === "TrainLoRA") {
      const chart = node.loraLoomChart ?? addChart(node);
      chart.history = LossHistory.fromJSON(node.properties?.[CURVE_PROPERTY]);
      redraw(chart);
      catchUpSoon(); // a run in progress (page reloaded mid-run) continues from the server's messages
    }
    if (node.comfyClass === "LoadLoRA") node.loraLoomShowInfo?.();
  },
});
