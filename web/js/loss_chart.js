// The TrainLoRA loss chart's logic: a bounded history of `lora_loom.train` messages and its drawing on a 2D
// canvas context. No editor imports, so node's test runner checks it as it is (tests/js/).

export const MAX_POINTS = 600; // kept per node; older points are thinned (every other one dropped)

const NUMBER_FIELDS = ["step", "total", "loss", "loss_ema", "lr", "eta_s"];

export function formatEta(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}

export class LossHistory {
  constructor(maxPoints = MAX_POINTS) {
    this.maxPoints = maxPoints;
    this.clear();
  }

  clear() {
    this.points = []; // [step, loss, loss_ema, lr]
    this.total = 0;
    this.etaS = null;
    this.stride = 1; // kept points lie on multiples of it (it doubles as the history thins)
  }

  get lastStep() {
    return this.points.length ? this.points[this.points.length - 1][0] : 0;
  }

  // Add one message; false if it is not a usable one. A step at or before the last one starts a new run
  // (a resumed or re-queued training sends its steps again from where it starts).
  add(message) {
    if (!message || NUMBER_FIELDS.slice(0, 3).some((k) => !Number.isFinite(message[k]))) return false;
    const step = message.step;
    if (step <= this.lastStep) this.clear();
    this.total = message.total;
    this.etaS = Number.isFinite(message.eta_s) ? message.eta_s : null;
    const point = [step, message.loss, finiteOr(message.loss_ema, message.loss), finiteOr(message.lr, null)];
    // Points are kept on a grid of `stride` steps; the newest point may sit between grid steps, and is
    // replaced by the next one until that one lands on the grid.
    const last = this.points[this.points.length - 1];
    if (last && last[0] % this.stride !== 0) this.points[this.points.length - 1] = point;
    else this.points.push(point);
    while (this.points.length > this.maxPoints) {
      this.stride *= 2;
      const newest = this.points.length - 1;
      this.points = this.points.filter((p, i) => p[0] % this.stride === 0 || i === newest);
    }
    return true;
  }

  status() {
    if (!this.points.length) return "waiting for the first step";
    const [step, loss, ema] = this.points[this.points.length - 1];
    const eta = this.etaS && step < this.total ? ` · ETA ${formatEta(this.etaS)}` : "";
    const done = step >= this.total ? " · done" : "";
    return `step ${step} / ${this.total} · loss ${ema.toFixed(4)} (last ${loss.toFixed(4)})${eta}${done}`;
  }

  toJSON() {
    return { points: this.points, total: this.total, stride: this.stride };
  }

  // The server's messages of a run (a page reloaded mid-run), then the points this history got live after the
  // last of them: messages that arrived while the server's copy was on its way are kept, not lost.
  static replay(messages, current, maxPoints = MAX_POINTS) {
    const history = new LossHistory(maxPoints);
    messages.forEach((message) => history.add(message));
    const [total, etaS] = [current.total, current.etaS];
    for (const [step, loss, lossEma, lr] of current.points) {
      if (step > history.lastStep) history.add({ step, total, loss, loss_ema: lossEma, lr, eta_s: etaS });
    }
    return history;
  }

  static fromJSON(saved, maxPoints = MAX_POINTS) {
    const history = new LossHistory(maxPoints);
    if (saved && Array.isArray(saved.points)) {
      history.points = saved.points.filter((p) => Array.isArray(p) && p.length === 4 && p.every(isNumberOrNull));
      history.total = Number.isFinite(saved.total) ? saved.total : history.lastStep;
      history.stride = Number.isFinite(saved.stride) && saved.stride >= 1 ? saved.stride : 1;
    }
    return history;
  }
}

function finiteOr(value, fallback) {
  return Number.isFinite(value) ? value : fallback;
}

function isNumberOrNull(value) {
  return value === null || Number.isFinite(value);
}

// The y range of the losses, robust to a first-steps spike: from the minimum to the 98th percentile.
export function lossRange(points) {
  const values = points.flatMap((p) => [p[1], p[2]]).sort((a, b) => a - b);
  if (!values.length) return [0, 1];
  const low = values[0];
  const high = values[Math.min(values.length - 1, Math.floor(values.length * 0.98))];
  return high > low ? [low, high] : [low - 0.5, low + 0.5];
}

export const COLOURS = { raw: "rgba(120,160,255,0.45)", ema: "#4a8cff", lr: "#e0a040", axis: "#888", text: "#ddd" };

// Draw the history into a width × height box of a CanvasRenderingContext2D: raw loss (faint), its moving
// average (strong), the learning rate (dashed, own scale) and the status line.
export function drawChart(ctx, history, width, height) {
  const pad = { left: 44, right: 8, top: 18, bottom: 16 };
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = COLOURS.text;
  ctx.fillText(history.status(), pad.left, 12);
  const points = history.points;
  if (!points.length) return 0;
  const plotW = Math.max(1, width - pad.left - pad.right);
  const plotH = Math.max(1, height - pad.top - pad.bottom);
  const total = Math.max(history.total, history.lastStep, 1);
  const [low, high] = lossRange(points);
  const x = (step) => pad.left + (plotW * step) / total;
  const y = (loss) => pad.top + plotH * (1 - (Math.min(Math.max(loss, low), high) - low) / (high - low));

  ctx.strokeStyle = COLOURS.axis;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(pad.left, pad.top);
  ctx.lineTo(pad.left, pad.top + plotH);
  ctx.lineTo(pad.left + plotW, pad.top + plotH);
  ctx.stroke();
  ctx.fillStyle = COLOURS.axis;
  ctx.fillText(high.toPrecision(3), 2, pad.top + 8);
  ctx.fillText(low.toPrecision(3), 2, pad.top + plotH);
  ctx.fillText(String(total), pad.left + plotW - 30, height - 3);

  const line = (index, colour, width, dash, scale) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.setLineDash(dash);
    ctx.beginPath();
    points.forEach((p, i) => {
      const value = scale(p[index]);
      if (i === 0) ctx.moveTo(x(p[0]), value);
      else ctx.lineTo(x(p[0]), value);
    });
    ctx.stroke();
    ctx.setLineDash([]);
  };
  line(1, COLOURS.raw, 1, [], y);
  line(2, COLOURS.ema, 2, [], y);
  const lrs = points.map((p) => p[3]).filter(Number.isFinite);
  if (lrs.length) {
    const lrHigh = Math.max(...lrs) || 1;
    line(3, COLOURS.lr, 1, [4, 3], (lr) => pad.top + plotH * (1 - (Number.isFinite(lr) ? lr : 0) / lrHigh));
  }
  return points.length;
}
