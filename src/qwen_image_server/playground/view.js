// What the output panel shows: the image (or a before/after slider for edits), the run's
// progress by denoising step with its elapsed time, and downloads in another format.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

// Object URLs by what shows them, revoked together when it shows something else (each holds its blob in memory).
const urls = {};

export function objectURL(owner, blob) {
  const url = URL.createObjectURL(blob);
  (urls[owner] ??= []).push(url);
  return url;
}

export function revokeURLs(owner) {
  for (const url of (urls[owner] ?? []).splice(0)) URL.revokeObjectURL(url);
}

export function b64ToBlob(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: `image/${format}` });
}

// Show one image in the viewer; with `before`, a slider between the input and the result.
export function showImage(viewer, url, { before = null, alt = "Result", kind = "final" } = {}) {
  viewer.classList.remove("empty");
  const after = el("img", { src: url, alt, className: "after", dataset: { kind } });
  if (!before) {
    viewer.replaceChildren(after);
    return;
  }
  const beforeImg = el("img", { src: before, alt: "Before", className: "before" });
  const slider = el("input", { type: "range", min: 0, max: 100, value: 50, className: "compare-slider" });
  slider.setAttribute("aria-label", "Before / after");
  const frame = el("div", { className: "compare" }, beforeImg, after, el("span", { className: "compare-line" }));
  const place = () => {
    frame.style.setProperty("--split", `${slider.value}%`);
  };
  slider.addEventListener("input", place);
  place();
  viewer.replaceChildren(frame, el("div", { className: "compare-labels row spread" }, "before", slider, "after"));
}

// Qwen-Image's previews come after evenly spaced steps (the server's preview_steps): the
// same picks here, with Python's round-half-to-even, give the step each preview stands for.
export function previewSteps(steps, partials) {
  const roundEven = (x) => {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  };
  const picks = [];
  for (let j = 0; j < partials; j++) picks.push(roundEven(((j + 1) * steps) / (partials + 1)) - 1);
  if (steps < 2) return [];
  return [...new Set(picks.map((p) => Math.min(Math.max(p, 0), steps - 2)))].sort((a, b) => a - b);
}

// The run's progress bar and text: waiting, busy (retrying), step k of N, elapsed seconds.
export class Progress {
  constructor(root) {
    this.root = root;
    this.bar = root.querySelector(".bar");
    this.meter = root.querySelector(".progress");
    this.text = root.querySelector(".run-text");
    this.timer = null;
  }

  start(steps, partials, label) {
    this.steps = steps;
    this.picks = previewSteps(steps, partials);
    this.step = 0;
    this.label = label;
    this.note = "";
    this.started = performance.now();
    this.root.hidden = false;
    this.root.dataset.state = "running";
    this.meter.classList.toggle("indeterminate", !this.picks.length);
    clearInterval(this.timer);
    this.timer = setInterval(() => this.render(), 100);
    this.render();
  }

  // A preview arrived: the denoising has passed its step.
  preview(partialIndex) {
    const step = this.picks[partialIndex];
    if (step !== undefined) this.step = Math.max(this.step, step + 1);
    this.note = "";
    this.render();
  }

  waiting(note) {
    this.note = note;
    this.render();
  }

  render() {
    const seconds = ((performance.now() - this.started) / 1000).toFixed(1);
    const fraction = this.steps ? this.step / this.steps : 0;
    this.bar.style.width = `${Math.round(fraction * 100)}%`;
    this.meter.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
    const where = this.note || (this.step ? `step ${this.step} of ${this.steps}` : `${this.steps} steps`);
    this.text.textContent = `${this.label} · ${where} · ${seconds} s`;
  }

  finish(state, message) {
    clearInterval(this.timer);
    this.timer = null;
    this.root.dataset.state = state;
    this.meter.classList.remove("indeterminate");
    if (state === "done") this.bar.style.width = "100%";
    const seconds = ((performance.now() - this.started) / 1000).toFixed(1);
    this.text.textContent = `${message} · ${seconds} s`;
  }
}

// Save `blob` as `format` (png, jpeg, webp), converting it in the browser when needed.
export async function download(blob, format, name) {
  let out = blob;
  if (blob.type !== `image/${format}`) {
    const bitmap = await createImageBitmap(blob);
    const canvas = el("canvas", { width: bitmap.width, height: bitmap.height });
    const ctx = canvas.getContext("2d");
    if (format === "jpeg") {
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
    }
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    out = await new Promise((resolve) => canvas.toBlob(resolve, `image/${format}`, 0.95));
  }
  const url = URL.createObjectURL(out);
  const link = el("a", { href: url, download: `${name}.${format === "jpeg" ? "jpg" : format}` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
