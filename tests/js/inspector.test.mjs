import test from "node:test";
import assert from "node:assert/strict";
import { clipboardText, infoUrl, inspectorRows } from "../../web/js/inspector.js";

const info = {
  name: "toy-star.safetensors", file: "toy-star.safetensors", bytes: 2 * 1024 * 1024, formats: ["kohya"],
  modules: { unet: 32, text_encoder: 0 }, ranks: { unet: [4], text_encoder: [] }, alphas: { unet: [4], text_encoder: [] },
  training: { steps: "300", resolution: "(64, 64)", base_model: "sd_v1" },
  trigger_words: [{ tag: "star", count: 12 }, { tag: "red star", count: 3 }],
  hashes: { sshs_model_hash: "abcdef0123456789", legacy_hash: "01234567" },
  not_understood: { "lora_te2_*…": 3 },
};

test("rows carry what a user picks a LoRA by", () => {
  const rows = Object.fromEntries(inspectorRows(info));
  assert.equal(rows.file, "toy-star.safetensors (2.0 MB)");
  assert.equal(rows.modules, "U-Net 32, text encoder 0");
  assert.equal(rows.rank, "U-Net 4; text encoder –");
  assert.equal(rows["trained steps"], "300");
  assert.equal(rows["trigger words"], "star (12), red star (3)");
  assert.equal(rows.hash, "abcdef012345");
  assert.equal(rows["not understood"], "3 keys: lora_te2_*… (3)");
});

test("errors show as an error row", () => {
  assert.deepEqual(inspectorRows({ error: "bad.safetensors: header is not JSON" }), [["error", "bad.safetensors: header is not JSON"]]);
  assert.deepEqual(inspectorRows(undefined), [["error", "no answer"]]);
});

test("trigger words for the clipboard, and the route url is encoded", () => {
  assert.equal(clipboardText(info), "star, red star");
  assert.equal(clipboardText({}), "");
  assert.equal(infoUrl("sub dir/a&b.safetensors"), "/lora_loom/lora_info?name=sub%20dir%2Fa%26b.safetensors");
});
