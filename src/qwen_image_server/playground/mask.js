// Painting an edit mask over an image with a brush and an eraser.
//
// Strokes go onto a canvas the size of the image itself (not of its on-screen copy), so
// the mask matches the image pixel for pixel. The exported mask follows OpenAI's
// convention, which the server reads: a PNG with an alpha channel whose fully
// transparent pixels (alpha 0) are edited and whose opaque pixels (alpha 255) are kept.

const PAINT = "rgba(255, 45, 85, 1)";

const PAINTED = 128; // the alpha from which a pixel of the paint layer is painted

export class MaskEditor {
  constructor(stage) {
    this.stage = stage;
    this.tool = "brush";
    this.brush = 40; // diameter in on-screen pixels
    this.canvas = null;
    this.painted = false;
    this.onchange = null;
    this.turn = 0; // each load or unload takes the next: a load that finishes after a later one is dropped
  }

  // Show `blob` (an image) with an empty mask over it; resolves once it is shown (or is no longer wanted: the
  // inputs changed while it was decoded, e.g. a second image added at once).
  async load(blob) {
    const turn = ++this.turn;
    const bitmap = await createImageBitmap(blob);
    if (turn !== this.turn) {
      bitmap.close();
      return;
    }
    this.width = bitmap.width;
    this.height = bitmap.height;
    const base = document.createElement("canvas");
    base.width = this.width;
    base.height = this.height;
    base.className = "mask-base";
    base.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    const canvas = document.createElement("canvas");
    canvas.width = this.width;
    canvas.height = this.height;
    canvas.className = "mask-paint";
    canvas.setAttribute("aria-label", "Mask: paint where the image should change");
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.painted = false;
    const frame = document.createElement("div");
    frame.className = "mask-frame";
    frame.style.aspectRatio = `${this.width} / ${this.height}`;
    // Its height is capped (60vh): so is its width, in proportion, or a tall image would be stretched across.
    frame.style.maxWidth = `calc(60vh * ${this.width} / ${this.height})`;
    frame.append(base, canvas);
    this.stage.replaceChildren(frame);
    this.listen(canvas);
  }

  unload(message = "Pick an image to paint a mask on it.") {
    this.turn += 1;
    this.canvas = null;
    this.painted = false;
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.textContent = message;
    this.stage.replaceChildren(hint);
  }

  listen(canvas) {
    let last = null;
    const point = (event) => {
      const box = canvas.getBoundingClientRect();
      const scale = this.width / box.width;
      return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * (this.height / box.height), scale };
    };
    const stroke = (from, to) => {
      const ctx = this.context;
      ctx.globalCompositeOperation = this.tool === "eraser" ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = PAINT;
      ctx.lineWidth = this.brush * to.scale;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x + 0.01, to.y); // a click without a move still leaves a dot
      ctx.stroke();
    };
    canvas.addEventListener("pointerdown", (event) => {
      event.preventDefault();
      canvas.setPointerCapture(event.pointerId);
      last = point(event);
      stroke(last, last);
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!last) return;
      const next = point(event);
      stroke(last, next);
      last = next;
    });
    const end = () => {
      if (!last) return;
      last = null;
      this.painted = this.hasPaint();
      this.onchange?.(this.painted);
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
  }

  // A pixel counts as painted from half opacity: the eraser's soft edge leaves faint paint along an erased stroke,
  // which counted, and sent a mask the user no longer saw.
  hasPaint() {
    if (!this.canvas) return false;
    const pixels = this.context.getImageData(0, 0, this.width, this.height).data;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] >= PAINTED) return true;
    return false;
  }

  clear() {
    if (!this.canvas) return;
    this.context.clearRect(0, 0, this.width, this.height);
    this.painted = false;
    this.onchange?.(false);
  }

  // The mask as an OpenAI-style PNG (transparent = edit), or null when nothing is painted.
  async toBlob() {
    if (!this.canvas || !this.hasPaint()) return null;
    const paint = this.context.getImageData(0, 0, this.width, this.height).data;
    const out = new ImageData(this.width, this.height);
    for (let i = 0; i < paint.length; i += 4) out.data[i + 3] = paint[i + 3] >= PAINTED ? 0 : 255; // black, opaque where kept
    const canvas = document.createElement("canvas");
    canvas.width = this.width;
    canvas.height = this.height;
    canvas.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  // Paint back a mask made by toBlob (for reopening an edit from the history).
  async paintFrom(blob) {
    if (!this.canvas || !blob) return;
    const bitmap = await createImageBitmap(blob);
    const scratch = document.createElement("canvas");
    scratch.width = this.width;
    scratch.height = this.height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(bitmap, 0, 0, this.width, this.height);
    bitmap.close();
    const mask = sctx.getImageData(0, 0, this.width, this.height).data;
    const paint = this.context.createImageData(this.width, this.height);
    for (let i = 0; i < mask.length; i += 4) {
      if (mask[i + 3] === 0) paint.data.set([255, 45, 85, 255], i);
    }
    this.context.putImageData(paint, 0, 0);
    this.painted = this.hasPaint();
    this.onchange?.(this.painted);
  }
}
