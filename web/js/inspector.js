// The LoRA inspector's logic: the JSON of GET /lora_loom/lora_info → labelled rows for the node. No editor
// imports (tests/js/ runs it under node's test runner).

export const INFO_ROUTE = "/lora_loom/lora_info";

export function infoUrl(name) {
  return `${INFO_ROUTE}?name=${encodeURIComponent(name)}`;
}

function list(values) {
  return values && values.length ? values.join(", ") : "–";
}

function bytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["B", "KB", "MB", "GB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

const TRAINING_LABELS = [
  ["base_model", "base model"],
  ["steps", "trained steps"],
  ["resolution", "resolution"],
  ["optimizer", "optimizer"],
  ["learning_rate", "learning rate"],
  ["train_images", "images"],
];

// [label, text] rows, in the order the node shows them. An error answer gives one "error" row.
export function inspectorRows(info) {
  if (!info || typeof info !== "object") return [["error", "no answer"]];
  if (info.error) return [["error", String(info.error)]];
  const modules = info.modules || {};
  const rows = [
    ["file", `${info.file ?? info.name} (${bytes(info.bytes)})`],
    ["format", list(info.formats)],
    ["modules", `U-Net ${modules.unet ?? 0}, text encoder ${modules.text_encoder ?? 0}`],
    ["rank", `U-Net ${list(info.ranks?.unet)}; text encoder ${list(info.ranks?.text_encoder)}`],
    ["alpha", `U-Net ${list(info.alphas?.unet)}; text encoder ${list(info.alphas?.text_encoder)}`],
  ];
  for (const [key, label] of TRAINING_LABELS) {
    if (info.training?.[key] !== undefined) rows.push([label, String(info.training[key])]);
  }
  const words = triggerWords(info, 8);
  if (words.length) rows.push(["trigger words", words.map((w) => `${w.tag} (${w.count})`).join(", ")]);
  const hashes = info.hashes || {};
  rows.push(["hash", hashes.sshs_model_hash ? hashes.sshs_model_hash.slice(0, 12) : `legacy ${hashes.legacy_hash ?? "?"}`]);
  const unknown = Object.entries(info.not_understood || {});
  if (unknown.length) {
    const total = unknown.reduce((sum, [, count]) => sum + count, 0);
    rows.push(["not understood", `${total} keys: ${unknown.slice(0, 3).map(([g, n]) => `${g} (${n})`).join(", ")}`]);
  }
  if (info.dora_modules) rows.push(["DoRA", `${info.dora_modules} modules (not applied)`]);
  return rows;
}

export function triggerWords(info, limit = 20) {
  return (info?.trigger_words || []).slice(0, limit);
}

// What the copy button puts on the clipboard: the top trigger words, comma-separated, as a prompt wants them.
export function clipboardText(info, limit = 5) {
  return triggerWords(info, limit)
    .map((w) => w.tag)
    .join(", ");
}
