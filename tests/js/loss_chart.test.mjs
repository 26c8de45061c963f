// node --test tests/js/ : the loss chart's history and drawing, without a browser.
import test from "node:test";
import assert from "node:assert/strict";
import { LossHistory, drawChart, formatEta, lossRange } from "../../web/js/loss_chart.js";

const message = (step, loss = 1 / step, total = 100) => ({
  node: "7", step, total, loss, loss_ema: loss * 1.1, lr: 1e-4, eta_s: (total - step) * 0.5,
});

test("messages build the history and the status line", () => {
  const history = new LossHistory();
  for (let step = 1; step <= 10; step++) assert.ok(history.add(message(step)));
  assert.equal(history.points.length, 10);
  assert.equal(history.lastStep, 10);
  assert.match(history.status(), /^step 10 \/ 100 · loss 0\.1100 \(last 0\.1000\) · ETA 0:45$/);
  history.add(message(100));
  assert.match(history.status(), /done$/);
});

test("bad messages are ignored", () => {
  const history = new LossHistory();
  assert.equal(history.add(null), false);
  assert.equal(history.add({ step: 1, total: 10 }), false);
  assert.equal(history.add({ step: 1, total: 10, loss: NaN }), false);
  assert.equal(history.points.length, 0);
});

test("a step at or before the last one starts a new run", () => {
  const history = new LossHistory();
  [1, 2, 3].forEach((s) => history.add(message(s)));
  history.add(message(2));
  assert.deepEqual(history.points.map((p) => p[0]), [2]);
});

test("a long run is thinned to a uniform grid, the newest step always kept", () => {
  const history = new LossHistory(50);
  for (let step = 1; step <= 1000; step++) history.add(message(step, 1, 1000));
  assert.ok(history.points.length <= 50, history.points.length);
  assert.equal(history.lastStep, 1000);
  const steps = history.points.map((p) => p[0]);
  const grid = steps.slice(0, -1); // the newest may sit between grid steps
  const gaps = new Set(grid.slice(1).map((s, i) => s - grid[i]));
  assert.deepEqual([...gaps], [history.stride]);
  assert.ok(steps.at(-1) - grid.at(-1) <= history.stride);
  history.add(message(1001, 1, 2000)); // between grid steps: provisional, then replaced
  history.add(message(1002, 1, 2000));
  assert.equal(history.points.length, steps.length); // 1000 was provisional too: 1002 took its place
  assert.equal(history.lastStep, 1002);
});

test("the saved curve comes back (workflow reopened) and junk does not", () => {
  const history = new LossHistory();
  [1, 2, 3].forEach((s) => history.add(message(s)));
  const saved = JSON.parse(JSON.stringify(history));
  const back = LossHistory.fromJSON(saved);
  assert.deepEqual(back.points, history.points);
  assert.equal(back.total, 100);
  assert.equal(LossHistory.fromJSON({ points: [[1, "x", 2, 3], "nope"] }).points.length, 0);
  assert.equal(LossHistory.fromJSON(undefined).points.length, 0);
});

test("eta and range helpers", () => {
  assert.equal(formatEta(65), "1:05");
  assert.equal(formatEta(3725), "1:02:05");
  assert.equal(formatEta(NaN), "");
  const points = Array.from({ length: 100 }, (_, i) => [i + 1, i === 0 ? 1000 : 1, 1, null]);
  assert.deepEqual(lossRange(points), [0.5, 1.5]); // a first-step spike does not squash the plot
});

function recordingContext() {
  const calls = [];
  return new Proxy(
    { calls },
    {
      get(target, name) {
        if (name === "calls") return calls;
        return (...args) => calls.push([name, ...args]);
      },
      set(target, name, value) {
        calls.push([`set ${String(name)}`, value]);
        return true;
      },
    },
  );
}

test("drawing puts the status line, both loss lines and the lr line on the canvas", () => {
  const history = new LossHistory();
  for (let step = 1; step <= 20; step++) history.add(message(step));
  const ctx = recordingContext();
  assert.equal(drawChart(ctx, history, 300, 160), 20);
  const texts = ctx.calls.filter((c) => c[0] === "fillText").map((c) => c[1]);
  assert.ok(texts[0].startsWith("step 20 / 100"));
  const strokes = ctx.calls.filter((c) => c[0] === "stroke").length;
  assert.equal(strokes, 4); // axes, raw, smoothed, lr
  const xs = ctx.calls.filter((c) => c[0] === "lineTo").map((c) => c[1]);
  assert.ok(xs.every((x) => x >= 0 && x <= 300));
  const empty = recordingContext();
  assert.equal(drawChart(empty, new LossHistory(), 300, 160), 0);
});

test("a replay of the server's messages keeps the live points that came after them", () => {
  const live = new LossHistory();
  [1, 2, 3, 7, 8].forEach((s) => live.add(message(s))); // reloaded page: saved 1-3, then live 7 and 8
  const server = [1, 2, 3, 4, 5, 6, 7].map((s) => message(s));
  const merged = LossHistory.replay(server, live);
  assert.deepEqual(merged.points.map((p) => p[0]), [1, 2, 3, 4, 5, 6, 7, 8]);
  assert.equal(merged.total, 100);
});
