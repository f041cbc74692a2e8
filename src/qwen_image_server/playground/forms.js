// The three request forms (generate, edit, variations): filling them with a model's
// defaults, reading them into request fields, putting a request back into them, their
// input images, and showing the server's errors next to the field they are about.

import { el, objectURL, revokeURLs } from "./view.js";

const NUMBERS = ["width", "height", "num_inference_steps", "true_cfg_scale", "seed", "n", "partial_images", "strength"];
const TEXTS = ["model", "prompt", "negative_prompt", "output_format", "cache"];
export const ASPECTS = { "1:1": [1, 1], "4:3": [4, 3], "3:4": [3, 4], "3:2": [3, 2], "2:3": [2, 3], "16:9": [16, 9], "9:16": [9, 16] };

// Put the shared prompt and settings fields into each form (one copy of their markup).
export function buildForm(form) {
  const prompt = document.getElementById("prompt-fields").content.cloneNode(true);
  if (form.querySelector(".prompt-fields").dataset.optional) {
    prompt.querySelector("textarea[name=prompt]").placeholder = "optional: what the variations should show";
  }
  form.querySelector(".prompt-fields").replaceWith(prompt);
  form.querySelector(".common-fields").replaceWith(document.getElementById("common-fields").content.cloneNode(true));
  form.inputs = []; // the input images (Blobs), for edits and variations
}

function number(value) {
  if (value === "" || value === undefined || value === null) return undefined;
  const parsed = Number(value);
  // A whole number past 2^53 (a seed) stays exact as a BigInt (api.js sends its digits as they are).
  if (/^\s*\d+\s*$/.test(value) && !Number.isSafeInteger(parsed)) return BigInt(value.trim());
  return Number.isFinite(parsed) ? parsed : value; // a non-number goes as is: the server says what is wrong
}

// The number fields of `form` holding text the browser cannot read as a number ("12-3", "1e"): their value reads
// as empty, and the field was left out of the request (a typed seed became a random one, without a word).
export function unreadNumber(form) {
  return NUMBERS.find((name) => form.elements[name]?.validity?.badInput) || null;
}

// The request fields of `form` (empty fields left out: the server's defaults apply).
export function readFields(form) {
  const elements = form.elements;
  const fields = {};
  for (const name of TEXTS) {
    const value = elements[name]?.value;
    if (value !== undefined && value.trim() !== "") fields[name] = name.endsWith("prompt") ? value : value.trim();
  }
  for (const name of NUMBERS) {
    const value = number(elements[name]?.value);
    if (value !== undefined) fields[name] = value;
  }
  const rewrite = form.querySelector(".rewrite-field");
  if (rewrite && !rewrite.hidden) fields.prompt_rewrite = elements.prompt_rewrite.checked;
  return fields;
}

// Put `fields` (a stored request, with the seed it was made with) back into `form`.
export function fillFields(form, fields) {
  const elements = form.elements;
  for (const name of [...TEXTS, ...NUMBERS]) {
    if (!elements[name]) continue;
    elements[name].value = fields[name] ?? (name === "n" ? 1 : "");
  }
  if (elements.prompt_rewrite && "prompt_rewrite" in fields) elements.prompt_rewrite.checked = fields.prompt_rewrite;
  if (elements.aspect) elements.aspect.value = "custom";
  if (elements.strength) form.querySelector("output[name=strength-value]").value = elements.strength.value;
  form.querySelector("details[data-params=negative_prompt]").open = Boolean(fields.negative_prompt);
}

// The model select: the served models (and LoRA ids) this form can use, failed ones marked.
export function fillModels(form, cards, settings, failed) {
  const select = form.elements.model;
  const kinds = select.dataset.kinds.split(" ");
  const previous = select.value;
  const options = cards
    .filter((card) => kinds.includes(card.kind))
    .map((card) => {
      const what = card.base_model ? `LoRA on ${card.base_model}` : card.kind;
      const broken = failed.has(card.base_model || card.id) ? " — unavailable" : "";
      return el("option", { value: card.id, textContent: `${card.id} (${what})${broken}` });
    });
  if (!options.length) options.push(el("option", { value: "", textContent: `no ${kinds.join(" / ")} model on this server` }));
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  const cache = form.elements.cache;
  const current = cache.value;
  cache.replaceChildren(
    el("option", { value: "", textContent: "model's setting" }),
    ...settings.cache_policies.map((name) => el("option", { value: name, textContent: name === "none" ? "off" : name })),
  );
  cache.value = current;
  form.querySelector(".rewrite-field").hidden = !settings.prompt_rewrite.available;
  form.elements.prompt_rewrite.checked = settings.prompt_rewrite.default;
}

function parseSize(text) {
  const match = /^(\d+)x(\d+)$/i.exec(text || "");
  return match ? [Number(match[1]), Number(match[2])] : [1024, 1024];
}

// The width and height of `aspect` at `area` pixels, multiples of 16 within the server's limits.
export function aspectSize(aspect, area, limits) {
  const [a, b] = ASPECTS[aspect] || [1, 1];
  const m = limits.size_multiple;
  const fit = (v) => Math.min(limits.max_side, Math.max(limits.min_side, Math.round(v / m) * m));
  let width = Math.sqrt((area * a) / b);
  let height = (width * b) / a;
  // Scaled as a whole into the side limits, so that the ratio holds (clamping each side alone made 16:9 near 4:3).
  const down = Math.min(1, limits.max_side / Math.max(width, height));
  const up = Math.max(1, limits.min_side / (Math.min(width, height) * down));
  width *= down * up;
  height *= down * up;
  return [fit(width), fit(height)];
}

// Defaults of the chosen model (a LoRA's preset first): steps, guidance, size, and its hint.
export function applyModelDefaults(form, settings) {
  const id = form.elements.model.value;
  const model = settings.models[id];
  const hint = form.querySelector(".model-hint");
  if (!model) {
    hint.textContent = "";
    return;
  }
  const preset = model.preset || {};
  const limits = settings.limits;
  const elements = form.elements;
  elements.num_inference_steps.value = preset.steps ?? model.default_steps;
  elements.num_inference_steps.max = limits.max_steps;
  elements.true_cfg_scale.value = preset.true_cfg_scale ?? settings.defaults.true_cfg_scale;
  elements.n.max = limits.max_n;
  for (const side of ["width", "height"]) {
    elements[side].min = limits.min_side;
    elements[side].max = limits.max_side;
  }
  if (elements.aspect && elements.aspect.value !== "custom") setAspect(form, settings);
  const parts = [`${model.default_size} by default`, `${model.default_steps} steps`];
  if (model.cache) parts.push(`step cache ${model.cache}`);
  if (Object.keys(preset).length) parts.push(`preset: ${Object.entries(preset).map(([k, v]) => `${k} ${v}`).join(", ")}`);
  hint.textContent = parts.join(" · ");
}

export function setAspect(form, settings) {
  const model = settings.models[form.elements.model.value];
  const [dw, dh] = parseSize(model?.default_size);
  const [width, height] = aspectSize(form.elements.aspect.value, dw * dh, settings.limits);
  form.elements.width.value = width;
  form.elements.height.value = height;
}

// The denoising steps a request runs (img2img skips the first ones, as diffusers does).
export function denoisingSteps(fields, settings, tab) {
  const model = settings?.models[fields.model] || {};
  const steps = Number(fields.num_inference_steps ?? model.preset?.steps ?? model.default_steps ?? 0);
  if (tab !== "variations") return steps;
  const strength = Number(fields.strength ?? 0.6);
  return steps - Math.trunc(Math.max(steps - Math.min(steps * strength, steps), 0));
}

// The input images of an edit or variation: thumbnails with a remove button.
export function setInputs(form, blobs, onchange) {
  form.inputs = blobs;
  const list = form.querySelector(".thumbs");
  revokeURLs(`inputs-${form.id}`);
  list.replaceChildren(
    ...blobs.map((blob, index) => {
      const url = objectURL(`inputs-${form.id}`, blob);
      const remove = el("button", { type: "button", className: "remove", textContent: "×", title: "Remove" });
      remove.setAttribute("aria-label", `Remove image ${index + 1}`);
      remove.addEventListener("click", () => setInputs(form, blobs.filter((_, i) => i !== index), onchange));
      return el("li", {}, el("img", { src: url, alt: `Input ${index + 1}` }), remove);
    }),
  );
  onchange?.(blobs);
}

// --- errors -------------------------------------------------------------------------

export function clearErrors(root) {
  root.classList.remove("invalid");
  for (const node of root.querySelectorAll(".error")) node.textContent = "";
  for (const node of root.querySelectorAll(".invalid")) node.classList.remove("invalid");
  for (const node of root.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

// The field of `form` an error's `param` names ("image[1]" is the images field).
function fieldFor(form, param) {
  const name = param.replace(/\[.*$/, "").replace(/^body\./, "").split(".")[0];
  return [...form.querySelectorAll("[data-params]")].find((field) => field.dataset.params.split(" ").includes(name)) || null;
}

// The server's message next to the field it is about (the form's own line otherwise).
export function showError(form, error) {
  let param = error.param;
  if (!param && ["model_unavailable", "model_not_found"].includes(error.code)) param = "model";
  let field = param ? fieldFor(form, param) : null;
  if (error.code === "invalid_api_key" || error.status === 401) field = document.querySelector(".key.field");
  const target = field?.querySelector(".error") || form.querySelector(".form-error");
  target.textContent = error.message;
  if (field) {
    field.classList.add("invalid");
    for (const control of field.querySelectorAll("input, select, textarea")) control.setAttribute("aria-invalid", "true");
    if (field.tagName === "DETAILS") field.open = true;
    field.scrollIntoView({ block: "nearest" });
  }
  return target;
}
