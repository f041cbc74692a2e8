// The playground page: tabs, the server's models and limits, running requests with live
// previews, the results and what can be done with them, and the history.

import { apiKey, getJSON, setApiKey, streamImages, withRetry } from "./api.js";
import {
  applyModelDefaults,
  buildForm,
  clearErrors,
  denoisingSteps,
  fillFields,
  fillModels,
  readFields,
  setAspect,
  setInputs,
  showError,
  unreadNumber,
} from "./forms.js";
import { addEntry, allEntries, clearEntries, deleteEntry, getEntry } from "./history.js";
import { MaskEditor } from "./mask.js";
import { b64ToBlob, download, el, objectURL, Progress, revokeURLs, showImage } from "./view.js";

const $ = (selector, root = document) => root.querySelector(selector);
const ENDPOINTS = { generate: "v1/images/generations", edit: "v1/images/edits", variations: "v1/images/variations" };
const LABELS = { generate: "Generating", edit: "Editing", variations: "Making variations" };

const forms = { generate: $("#generate"), edit: $("#edit"), variations: $("#variations") };
const output = $(".output");
const viewer = $(".viewer", output);
const previews = $(".previews", output);
const results = $(".results", output);
const progress = new Progress($(".run-state", output));
const mask = new MaskEditor($(".mask-stage", forms.edit));
const state = {
  settings: null, cards: [], failed: new Set(), run: null, results: [], selected: null, lastSeed: {}, load: null,
  loadFailed: null, // why the last load failed ("key" or "network"), else null
  unreachable: false, // a /ready poll found no server since the last load
  maskImage: null, // the image the mask is painted on (the edit's first)
};

// --- the server ----------------------------------------------------------------------

// The server's settings and models fill the forms (each model's defaults). Until they have, the badge says
// "loading" and nothing else sets it; a load started later (a new API key) wins over one still in flight.
async function loadServer() {
  const key = $(".key.field");
  clearErrors(key);
  const load = {};
  state.load = load;
  setStatus("loading…", "loading");
  try {
    const [settings, models] = await Promise.all([getJSON("playground/settings"), getJSON("v1/models")]);
    if (state.load !== load) return;
    const first = !state.settings;
    state.settings = settings;
    state.cards = models.data;
    for (const form of Object.values(forms)) {
      const before = form.elements.model.value;
      fillModels(form, state.cards, settings, state.failed);
      // a model's defaults when its model changes: a load for a new key reset the steps and guidance typed in
      if (first || form.elements.model.value !== before) applyModelDefaults(form, settings);
    }
  } catch (error) {
    if (state.load !== load) return;
    state.load = null;
    state.loadFailed = error.status === 401 ? "key" : "network";
    $(".error", key).textContent = error.status === 401 ? error.message : `Cannot reach the server: ${error.message}`;
    key.classList.add("invalid");
    setStatus(error.status === 401 ? "no access" : "server unreachable", "failed");
    return;
  }
  state.load = null;
  state.loadFailed = null;
  await pollReady();
}

function setStatus(text, kind) {
  const badge = $("#server-status");
  badge.textContent = text;
  badge.dataset.state = kind;
}

// /ready says which models are loading, ready or failed (failed ones are marked in the selects).
async function pollReady() {
  if (state.load) return; // the load in flight sets the badge when it is done
  if (state.loadFailed === "key") return; // "no access" until another key is given
  if (state.loadFailed === "network") return loadServer(); // the server may be back: load what it serves
  let body;
  try {
    const response = await fetch("ready", { headers: apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {} });
    body = await response.json();
  } catch {
    if (!state.load) setStatus("server unreachable", "failed");
    state.unreachable = true;
    return;
  }
  if (state.load) return; // a load began while this was asked
  if (state.unreachable) {
    // the server is back, perhaps another one (its models, its keys): load what it serves, as at the start
    state.unreachable = false;
    return loadServer();
  }
  const failed = new Set(Object.entries(body.models || {}).filter(([, m]) => m.state === "failed").map(([id]) => id));
  if (failed.size) setStatus(`unavailable: ${[...failed].join(", ")}`, "failed");
  else setStatus(body.status === "ready" ? "ready" : "loading models…", body.status === "ready" ? "ready" : "loading");
  const changed = [...failed].join() !== [...state.failed].join();
  state.failed = failed;
  if (changed && state.settings) for (const form of Object.values(forms)) fillModels(form, state.cards, state.settings, failed);
}

// --- running requests ----------------------------------------------------------------------

function requestBody(tab, fields, inputs, maskBlob) {
  if (tab === "generate") return { ...fields, stream: true, response_format: "b64_json" };
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  form.append("stream", "true");
  const several = inputs.length > 1;
  inputs.forEach((blob, i) => {
    form.append(several ? "image[]" : "image", blob, `image-${i + 1}.${(blob.type || "image/png").split("/")[1]}`);
  });
  if (maskBlob) form.append("mask", maskBlob, "mask.png");
  return form;
}

// Send one request (a form's, or one from the history) and show its previews and results. `maskSource` is the mask's
// Blob, or a promise of it (a painted one being encoded): the run shows as running at once, before it is ready.
// What a result is compared with: the edited image, the first when a mask was painted (the server edits the first of
// several within it, and the result has its size), else the last (several images without a mask: the edit-plus call
// renders at the last one's aspect ratio).
function beforeImage(inputs, mask) {
  if (!inputs.length) return null;
  return mask ? inputs[0] : inputs[inputs.length - 1];
}

async function run(tab, fields, inputs = [], maskSource = null) {
  if (state.run) return;
  const form = forms[tab];
  clearErrors(form);
  clearErrors($(".key.field"));
  const controller = new AbortController();
  state.run = { controller, tab };
  setRunning(true);
  revokeURLs("previews");
  previews.replaceChildren();
  const created = Date.now(); // the run's entries share it: the history lists them together, in order
  progress.start(denoisingSteps(fields, state.settings, tab), Number(fields.partial_images || 0), LABELS[tab]);
  // on a narrow screen the output is above the forms: a run began out of sight (its previews, Cancel, the result)
  if (matchMedia("(max-width: 820px)").matches) output.scrollIntoView({ block: "start" });
  let before = null; // the input the results are compared with (revoked with them)
  let maskBlob = null;
  const onPartial = (event) => {
    const url = objectURL("previews", b64ToBlob(event.b64_json, event.output_format));
    progress.preview(event.partial_image_index);
    const alt = `Preview ${event.partial_image_index + 1} of image ${event.image_index + 1}`;
    previews.append(el("li", {}, el("img", { src: url, alt, dataset: { kind: "preview" } })));
    if (event.image_index === 0) showImage(viewer, url, { alt: "Preview", kind: "preview" });
  };
  try {
    maskBlob = await maskSource;
    before = beforeImage(inputs, maskBlob) && URL.createObjectURL(beforeImage(inputs, maskBlob));
    const body = requestBody(tab, fields, inputs, maskBlob);
    const attempt = () => {
      progress.waiting(""); // a retry is sent: "server busy" no more (it stayed up while the accepted job ran)
      return streamImages(ENDPOINTS[tab], body, { signal: controller.signal, onPartial });
    };
    const completed = await withRetry(attempt, {
      signal: controller.signal,
      onWait: (left) => progress.waiting(`server busy, retrying in ${left} s`),
    });
    const made = [];
    for (const event of completed) {
      const blob = b64ToBlob(event.b64_json, event.output_format);
      const entry = {
        created,
        tab,
        endpoint: ENDPOINTS[tab],
        fields,
        inputs,
        mask: maskBlob,
        image: blob,
        seed: event.seed,
        size: event.size,
        format: event.output_format,
        revised_prompt: event.revised_prompt,
        stats: event.stats,
      };
      entry.id = await addEntry(entry).catch(() => null); // a browser without storage still shows the image
      made.push({ ...entry, url: URL.createObjectURL(blob), before });
    }
    state.lastSeed[tab] = made[0]?.seed;
    const kept = [...made, ...state.results].slice(0, 24);
    dropResults(state.results.filter((item) => !kept.includes(item)), kept);
    state.results = kept;
    renderResults();
    select(made[0]);
    progress.finish("done", `Done: ${made.length} image${made.length === 1 ? "" : "s"}`);
    renderHistory();
  } catch (error) {
    if (before) URL.revokeObjectURL(before);
    // The viewer showed this run's previews: it shows the selected result again, which its actions act on.
    if (state.selected) select(state.selected);
    else {
      viewer.replaceChildren();
      viewer.classList.add("empty");
    }
    if (error.name === "AbortError") {
      progress.finish("cancelled", "Cancelled");
    } else {
      const reached = error instanceof TypeError ? { message: `Cannot reach the server: ${error.message}` } : error;
      showError(form, reached);
      if (error.status === 401) {
        // the key was refused (a server restarted with another): "no access" until a key works, as a load says it
        state.loadFailed = "key";
        setStatus("no access", "failed");
      }
      progress.finish("failed", `Failed: ${reached.message}`);
    }
  } finally {
    state.run = null;
    setRunning(false);
  }
}

/** One run at a time: while one goes, what would start another (each form's submit, the history's re-runs) is off. */
function setRunning(running) {
  for (const button of document.querySelectorAll("form button[type=submit], .history-list [data-action=rerun]")) {
    button.disabled = running;
  }
}

async function submit(tab) {
  const form = forms[tab];
  clearErrors(form);
  const unread = unreadNumber(form);
  if (unread) return showError(form, { param: unread, message: "Not a number: type digits only (the field reads as empty)" });
  const fields = readFields(form);
  if (tab === "edit" && !form.inputs.length) return showError(form, { param: "image", message: "Pick an image to edit" });
  if (tab === "variations" && !form.inputs.length) return showError(form, { param: "image", message: "Pick an image to vary" });
  // a variation without a prompt varies the image freely, without CFG (the guidance field is prefilled for prompts)
  if (tab === "variations" && !fields.prompt && !fields.negative_prompt) delete fields.true_cfg_scale;
  return run(tab, fields, form.inputs, tab === "edit" ? mask.toBlob() : null); // on the first image, also of several
}

// --- results ----------------------------------------------------------------------------

function renderResults() {
  results.replaceChildren(
    ...state.results.map((item) => {
      const button = el("button", { type: "button", className: "thumb" }, el("img", { src: item.url, alt: `Seed ${item.seed}` }));
      button.addEventListener("click", () => select(item));
      return el("li", { className: item === state.selected ? "selected" : "" }, button);
    }),
  );
}

// Revoke the object URLs of results no longer kept (a run's input image URL once no kept result shows it).
function dropResults(dropped, kept) {
  for (const item of dropped) {
    URL.revokeObjectURL(item.url);
    if (item.before && !kept.some((other) => other.before === item.before)) URL.revokeObjectURL(item.before);
  }
}

function select(item) {
  if (!item) return;
  if (state.results.includes(item)) revokeURLs("shown"); // a history entry shown before it
  state.selected = item;
  showImage(viewer, item.url, { before: item.tab === "generate" ? null : item.before, alt: item.fields.prompt || "Result" });
  $(".result-actions", output).hidden = false;
  $("select[name=download-format]", output).value = item.format;
  const stats = item.stats?.pipeline_seconds !== undefined ? ` · pipeline ${item.stats.pipeline_seconds.toFixed(2)} s` : "";
  const revised = item.revised_prompt && item.revised_prompt !== item.fields.prompt ? ` · rewritten: ${item.revised_prompt}` : "";
  $(".result-info", output).textContent = `seed ${item.seed} · ${item.size} · ${item.format}${stats}${revised}`;
  renderResults();
}

function asFile(blob, name) {
  return new File([blob], `${name}.${blob.type.split("/")[1] || "png"}`, { type: blob.type });
}

async function useAsInput(tab, blob) {
  showTab(tab);
  const form = forms[tab];
  // added to an edit-plus model's images within its limit, as picked files are (acceptFiles says what it left out)
  if (tab === "edit" && form.inputs.length && isMulti()) return acceptFiles(form, [blob], onEditInputs);
  setInputs(form, [blob], tab === "edit" ? onEditInputs : undefined);
}

function resultAction(action) {
  const item = state.selected;
  if (!item) return;
  if (action === "download") download(item.image, $("select[name=download-format]", output).value, `qwen-image-${item.seed}`);
  if (action === "vary") useAsInput("variations", asFile(item.image, `result-${item.seed}`));
  if (action === "edit") useAsInput("edit", asFile(item.image, `result-${item.seed}`));
  if (action === "reuse-seed") {
    showTab(item.tab);
    forms[item.tab].elements.seed.value = item.seed;
  }
}

// --- history ----------------------------------------------------------------------------

async function renderHistory() {
  let entries = [];
  try {
    entries = await allEntries();
  } catch {
    $("#history .hint").textContent = "This browser does not keep a history here (IndexedDB is not available).";
  }
  $("#history-count").textContent = entries.length ? String(entries.length) : "";
  revokeURLs("history");
  $(".history-list").replaceChildren(
    ...entries.map((entry) => {
      const url = objectURL("history", entry.image);
      const when = new Date(entry.created).toLocaleString();
      const text = entry.fields.prompt || "(no prompt)";
      const buttons = ["show", "rerun", "open", "download", "delete"].map((action) => {
        const label = { show: "Show", rerun: "Re-run", open: "Open", download: "Download", delete: "Delete" }[action];
        const button = el("button", { type: "button", textContent: label, dataset: { action, id: entry.id } });
        if (action === "rerun") button.disabled = Boolean(state.run); // the list is redrawn while a run goes too
        return button;
      });
      return el(
        "li",
        { className: "history-item", dataset: { id: entry.id } },
        el("img", { src: url, alt: text }),
        el(
          "div",
          {},
          el("p", { className: "history-prompt", textContent: text }),
          el("p", { className: "hint", textContent: `${entry.tab} · ${entry.fields.model || "default model"} · ${entry.size} · seed ${entry.seed} · ${when}` }),
          el("div", { className: "row small" }, ...buttons),
        ),
      );
    }),
  );
}

async function historyAction(action, id) {
  const entry = await getEntry(id);
  if (!entry) return;
  if (action === "delete") {
    await deleteEntry(id);
    return renderHistory();
  }
  if (action === "download") return download(entry.image, entry.format, `qwen-image-${entry.seed}`);
  if (action === "show") {
    revokeURLs("shown");
    const before = beforeImage(entry.inputs, entry.mask) && objectURL("shown", beforeImage(entry.inputs, entry.mask));
    return select({ ...entry, url: objectURL("shown", entry.image), before });
  }
  showTab(entry.tab);
  if (action === "rerun") return run(entry.tab, entry.fields, entry.inputs, entry.mask);
  // open: the form gets the request back, with the seed this image was made with
  const form = forms[entry.tab];
  fillFields(form, { ...entry.fields, seed: entry.seed });
  if (entry.tab !== "generate") setInputs(form, entry.inputs, entry.tab === "edit" ? onEditInputs : undefined);
  if (entry.mask) await mask.ready?.then(() => mask.paintFrom(entry.mask));
}

// --- wiring -------------------------------------------------------------------------------

function showTab(tab) {
  for (const button of document.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
    button.tabIndex = button.dataset.tab === tab ? 0 : -1; // one tab stop for the tab list; arrows move within it
  }
  for (const panel of document.querySelectorAll(".tab-panel")) panel.hidden = panel.id !== tab;
  if (tab === "history") renderHistory();
}

function isMulti() {
  return state.settings?.models[forms.edit.elements.model.value]?.kind === "edit-plus";
}

// The mask is painted on the first image (with several, the server applies it to the first, as OpenAI's does).
function onEditInputs(blobs) {
  if (blobs.length) {
    if (state.maskImage === blobs[0]) return; // the first image stays: so does its mask
    state.maskImage = blobs[0];
    mask.ready = mask.load(blobs[0]).catch(() => {
      mask.unload("This browser cannot decode the image, so no mask can be painted on it.");
      showError(forms.edit, { param: "image", message: "This browser cannot decode the image (is it a PNG, JPEG or WebP?)" });
    });
  } else {
    state.maskImage = null;
    mask.unload();
    mask.ready = Promise.resolve();
  }
}

function acceptFiles(form, files, onchange) {
  clearErrors(form.querySelector("[data-params~=image]") || form);
  const all = [...files];
  const most = state.settings?.limits.max_upload_bytes || Infinity; // a larger file was uploaded whole, then refused
  const large = all.filter((file) => file.size > most);
  const images = all.filter((file) => /^image\/(png|jpeg|webp)$/.test(file.type) && file.size <= most);
  const multi = form === forms.edit && isMulti();
  const limit = multi ? state.settings?.limits.max_input_images || Infinity : 1;
  const taken = (multi ? [...form.inputs, ...images] : images).slice(0, limit);
  const left = [];
  if (large.length) left.push(`${large.length} larger than the ${Math.floor(most / 2 ** 20)} MiB the server takes`);
  if (images.length + large.length < all.length) left.push(`${all.length - images.length - large.length} not a PNG, JPEG or WebP image`);
  if (taken.length < (multi ? form.inputs.length : 0) + images.length) left.push(`more than the ${limit} image${limit === 1 ? "" : "s"} this model takes`);
  if (left.length) showError(form, { param: "image", message: `Not added: ${left.join("; ")}.` });
  if (images.length) setInputs(form, taken, onchange);
}

function wire() {
  const keyInput = $("#api-key");
  keyInput.value = apiKey();
  // kept as it is typed (Ctrl+Enter from the field sent the key before it), loaded with once it is changed
  keyInput.addEventListener("input", () => setApiKey(keyInput.value.trim()));
  keyInput.addEventListener("change", () => {
    setApiKey(keyInput.value.trim());
    loadServer();
  });
  const tabs = [...document.querySelectorAll(".tabs button")];
  for (const button of tabs) button.addEventListener("click", () => showTab(button.dataset.tab));
  $(".tabs").addEventListener("keydown", (event) => {
    // the tab list's keys: arrows to the next or previous tab (round), Home and End to the first and last
    const steps = { ArrowRight: 1, ArrowLeft: -1, Home: 0, End: 0 };
    if (!(event.key in steps)) return;
    event.preventDefault();
    const at = Math.max(0, tabs.indexOf(document.activeElement));
    const index = { Home: 0, End: tabs.length - 1 }[event.key] ?? (at + steps[event.key] + tabs.length) % tabs.length;
    showTab(tabs[index].dataset.tab);
    tabs[index].focus();
  });
  for (const [tab, form] of Object.entries(forms)) {
    buildForm(form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      submit(tab);
    });
    form.elements.model.addEventListener("change", () => state.settings && applyModelDefaults(form, state.settings));
    form.addEventListener("click", (event) => {
      const seed = event.target.dataset?.seed;
      if (seed === "random") form.elements.seed.value = "";
      if (seed === "reuse" && state.lastSeed[tab] !== undefined) form.elements.seed.value = state.lastSeed[tab];
    });
    const onchange = tab === "edit" ? onEditInputs : undefined;
    const drop = $(".drop", form);
    if (drop) {
      const input = $("input[type=file]", drop);
      drop.addEventListener("keydown", (event) => {
        if (event.target === drop && (event.key === "Enter" || event.key === " ")) {
          event.preventDefault();
          input.click();
        }
      });
      input.addEventListener("change", () => {
        acceptFiles(form, input.files, onchange);
        input.value = "";
      });
      drop.addEventListener("dragover", (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
      drop.addEventListener("dragleave", () => drop.classList.remove("over"));
      drop.addEventListener("drop", (event) => {
        event.preventDefault();
        drop.classList.remove("over");
        acceptFiles(form, event.dataTransfer.files, onchange);
      });
    }
  }
  const gen = forms.generate;
  gen.elements.aspect.addEventListener("change", () => gen.elements.aspect.value !== "custom" && state.settings && setAspect(gen, state.settings));
  for (const side of ["width", "height"]) gen.elements[side].addEventListener("input", () => (gen.elements.aspect.value = "custom"));
  const strength = forms.variations.elements.strength;
  strength.addEventListener("input", () => ($("output[name=strength-value]", forms.variations).value = strength.value));
  for (const button of document.querySelectorAll(".mask-tools [data-tool]")) {
    button.addEventListener("click", () => {
      mask.tool = button.dataset.tool;
      for (const other of document.querySelectorAll(".mask-tools [data-tool]")) other.setAttribute("aria-pressed", String(other === button));
    });
  }
  $(".mask-tools input[name=brush]").addEventListener("input", (event) => (mask.brush = Number(event.target.value)));
  $(".mask-tools [data-mask=clear]").addEventListener("click", () => mask.clear());
  $(".cancel", output).addEventListener("click", () => state.run?.controller.abort());
  $(".result-actions", output).addEventListener("click", (event) => event.target.dataset.action && resultAction(event.target.dataset.action));
  $(".history-list").addEventListener("click", (event) => {
    const { action, id } = event.target.dataset || {};
    if (action) historyAction(action, Number(id));
  });
  $("#history-clear").addEventListener("click", async () => {
    if (confirm("Delete every image in this browser's history?")) await clearEntries();
    renderHistory();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !state.run) {
      const tab = Object.keys(forms).find((name) => !forms[name].hidden);
      if (tab) submit(tab);
    }
  });
}

wire();
loadServer();
renderHistory();
setInterval(pollReady, 5000);
