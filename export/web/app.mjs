// The page: loads the export served at ./export/ with onnxruntime-web (WebGPU when the browser has it,
// else WebAssembly), streams generated text into the page, and leaves what it did in window.gptx:
//   status  "loading" | "ready" | "running" | "done" | "error"
//   result  {prompt_ids, ids, text} once a generation ends (ids stop at and include end-of-text)
//   stats   {backend, threads, load_ms, prompt_tokens, new_tokens, ttft_ms, tokens_per_s, decode_tokens_per_s,
//            cross_origin_isolated, proxy}
//   error   the message when status is "error"
//   generate(query)  once ready: another generation on the loaded model, its settings a URL query string;
//            resolves to {status, result, stats, error} (gptx bench times repeated runs without reloading)
// Settings come from the URL query (prompt or ids, max_new_tokens, temperature, top_k, top_p, seed,
// stop_at_eot, threads) or the form; a query with a prompt or ids starts generating once the model is loaded.
import { Tokenizer } from "@huggingface/tokenizers";
import { Sampler, loadExport } from "./gptx.mjs";

const EXPORT = "export/";
const $ = (id) => document.getElementById(id);
const state = (window.gptx = { status: "loading", result: null, stats: null, error: null, meta: null });
let model = null; // {meta, tokenizer, decoder, backend, threads, loadMs}
let stopRequested = false;

// ---- settings ------------------------------------------------------------------------------------

const FIELDS = {
  max_new_tokens: { integer: true, min: 1, fallback: 100 },
  temperature: { min: 0, fallback: 0.8 },
  top_k: { integer: true, min: 1, fallback: 200 },
  top_p: { min: 0, minOpen: true, max: 1, fallback: null },
  seed: { integer: true, min: 0, fallback: null },
  threads: { integer: true, min: 0, fallback: 0 }, // WebAssembly threads; 0: onnxruntime's choice
  stop_at_eot: { integer: true, min: 0, max: 1, fallback: 1 }, // 0: always max_new_tokens (a benchmark's fixed length)
};

function parseField(name, text) {
  const rule = FIELDS[name];
  if (text === null) return rule.fallback;
  if (text.trim() === "" || text === "off") return ["top_k", "top_p", "seed"].includes(name) ? null : rule.fallback;
  const v = Number(text);
  const bad = !Number.isFinite(v) || (rule.integer && !Number.isInteger(v)) || v < rule.min || (rule.minOpen && v === rule.min) ||
    (rule.max !== undefined && v > rule.max) || (rule.integer && !Number.isSafeInteger(v));
  if (bad) {
    const range = rule.max !== undefined ? `in ${rule.minOpen ? "(" : "["}${rule.min}, ${rule.max}]` : `>= ${rule.min}`;
    throw new Error(`${name}: expected ${rule.integer ? "an integer" : "a number"} ${range}, got ${JSON.stringify(text)}`);
  }
  return v;
}

function readSettings(get) { // get(name) -> string or null
  const settings = { prompt: get("prompt") ?? "", ids: get("ids") }; // ids: checked against the loaded vocabulary
  if (settings.ids !== null && settings.prompt !== "") throw new Error("ids: give the prompt as text or as ids, not both");
  for (const name of Object.keys(FIELDS)) settings[name] = parseField(name, get(name));
  return settings;
}

// The prompt as token ids ("464,3290,..."): what a benchmark feeds, token for token, whatever the tokenizer
// would make of the text. Each below the tokenizer's vocabulary size.
function parseIds(text, vocab) {
  const parts = text.split(",");
  const bad = parts.find((p) => !/^\d{1,15}$/.test(p.trim()) || Number(p) >= vocab);
  if (bad !== undefined) {
    throw new Error(`ids: expected comma-separated token ids below ${vocab}, got ${JSON.stringify(bad.length > 40 ? `${bad.slice(0, 40)}…` : bad)}`);
  }
  return parts.map(Number);
}

function fillForm(params) {
  const form = $("form");
  for (const [name, value] of params) if (form.elements[name]) form.elements[name].value = value;
}

// ---- loading -------------------------------------------------------------------------------------

async function readJson(name) {
  const r = await fetch(EXPORT + name);
  if (!r.ok) throw new Error(`${name}: HTTP ${r.status} from the server`);
  return r.json();
}

async function download(name, onProgress) { // the model's bytes, with progress for big files
  const r = await fetch(EXPORT + name);
  if (!r.ok) throw new Error(`${name}: HTTP ${r.status} from the server`);
  const total = Number(r.headers.get("Content-Length")) || 0;
  const reader = r.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    onProgress(received, total);
  }
  const bytes = new Uint8Array(received);
  let at = 0;
  for (const c of chunks) { bytes.set(c, at); at += c.length; }
  return bytes;
}

async function hasWebGpu() { // navigator.gpu alone is not enough: headless browsers often have no adapter
  try { return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter())); } catch { return false; }
}

async function runtimes() { // [{ort, backend}] to try in order
  const out = [];
  if (await hasWebGpu()) {
    try { out.push({ ort: await import("onnxruntime-web/webgpu"), backend: "webgpu" }); } catch (err) { console.warn("WebGPU build:", err); }
  }
  out.push({ ort: await import("onnxruntime-web/wasm"), backend: "wasm" });
  return out;
}

async function load(threads) {
  const t0 = performance.now();
  const bytes = await download("model.onnx", (got, total) => status(`Downloading the model… ${mb(got)}${total ? ` of ${mb(total)}` : ""}`));
  let lastError = null;
  for (const { ort, backend } of await runtimes()) {
    if (threads) ort.env.wasm.numThreads = threads;
    status(`Starting onnxruntime (${backend})…`);
    try {
      const providers = backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
      const loaded = await loadExport({ ort, Tokenizer, readJson, modelLocation: bytes, sessionOptions: { executionProviders: providers } });
      // what decides the WebAssembly speed: threads need cross-origin isolation (SharedArrayBuffer);
      // proxy runs onnxruntime in a worker instead of this page's thread
      const runtime = { cross_origin_isolated: self.crossOriginIsolated, proxy: ort.env.wasm.proxy };
      return { ...loaded, backend, threads: ort.env.wasm.numThreads, runtime, loadMs: performance.now() - t0 };
    } catch (err) {
      if (err.message.startsWith("gptx_export.json") || err.message.startsWith("model.onnx") || backend === "wasm") throw err;
      console.warn(`${backend} failed, trying the next runtime:`, err);
      lastError = err;
    }
  }
  throw lastError;
}

// ---- the page ------------------------------------------------------------------------------------

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

function status(text, kind = "") {
  $("status").textContent = text;
  $("status").className = `status ${kind}`;
}

function showModel(m) {
  const tok = m.meta.tokenizer.kind === "gpt2" || m.meta.tokenizer.gpt2_bpe ? "GPT-2 BPE" : `${m.meta.tokenizer.kind} tokenizer`;
  const { n_layer, n_embd, vocab_size, context_length, parameters } = m.meta.model;
  const chips = [`${n_layer} layers × ${n_embd}`, parameters ? `${(parameters / 1e6).toFixed(1)} M params` : null,
    `vocab ${vocab_size.toLocaleString("en")}`, `context ${context_length}`, tok,
    `${m.backend}${m.backend === "wasm" ? ` · ${m.threads} thread${m.threads === 1 ? "" : "s"}` : ""}`];
  $("model").replaceChildren(...chips.filter(Boolean).map((c) => Object.assign(document.createElement("li"), { textContent: c })));
}

function busy(on) {
  $("go").disabled = on;
  $("stop").disabled = !on;
  $("cursor").hidden = !on;
}

const yieldToPage = () => (globalThis.scheduler?.yield ? scheduler.yield() : new Promise((resolve) => setTimeout(resolve, 0)));

async function generate(settings) {
  const { tokenizer, decoder } = model;
  Object.assign(state, { status: "running", result: null, stats: null, error: null });
  stopRequested = false;
  const promptIds = settings.ids !== null ? parseIds(settings.ids, model.meta.tokenizer.vocab_size) : tokenizer.encode(settings.prompt);
  const sampler = new Sampler({ temperature: settings.temperature, topK: settings.top_k, topP: settings.top_p, seed: settings.seed });
  $("out-prompt").textContent = settings.ids !== null ? tokenizer.decode(promptIds) : settings.prompt;
  $("out-new").textContent = "";
  busy(true);
  status("Generating…");
  const t0 = performance.now();
  let first = null;
  const out = await decoder.generate([promptIds], settings.max_new_tokens, sampler, async (_next, ids) => {
    first ??= performance.now();
    $("out-new").textContent = tokenizer.decode(ids[0]);
    await yieldToPage(); // let the page paint the new text
    return !stopRequested;
  }, { stopAtEot: settings.stop_at_eot === 1 });
  const end = performance.now();
  const ids = out.ids[0];
  state.stats = {
    backend: model.backend, threads: model.threads, load_ms: Math.round(model.loadMs), prompt_tokens: promptIds.length,
    new_tokens: ids.length, ttft_ms: +(first - t0).toFixed(1), tokens_per_s: +(ids.length / ((end - t0) / 1e3)).toFixed(1),
    decode_tokens_per_s: ids.length > 1 ? +((ids.length - 1) / ((end - first) / 1e3)).toFixed(1) : null,
    ...model.runtime,
  };
  state.result = { prompt_ids: promptIds, ids, text: tokenizer.decode(ids) };
  state.status = "done";
  busy(false);
  const why = stopRequested ? "stopped" : ids.at(-1) === decoder.eot ? "end of text" : "max tokens";
  status(`${ids.length} tokens in ${((end - t0) / 1e3).toFixed(2)} s · ${state.stats.tokens_per_s} tokens/s · ` +
    `first token ${state.stats.ttft_ms} ms · ${why}`);
}

function fail(err) {
  Object.assign(state, { status: "error", error: err.message || String(err) });
  busy(false);
  status(`Error: ${state.error}`, "error");
  $("go").disabled = model === null;
}

async function submit(event) {
  event.preventDefault();
  try {
    const form = new FormData($("form"));
    const settings = readSettings((name) => form.get(name));
    const query = new URLSearchParams([...form].filter(([, v]) => v !== ""));
    const threads = new URLSearchParams(location.search).get("threads"); // a load setting, not in the form
    if (threads) query.set("threads", threads);
    history.replaceState(null, "", `?${query}`); // the URL repeats this generation
    await generate(settings);
  } catch (err) { fail(err); }
}

async function main() {
  const params = new URLSearchParams(location.search);
  fillForm(params);
  $("form").addEventListener("submit", submit);
  $("stop").addEventListener("click", () => { stopRequested = true; });
  try {
    model = await load(parseField("threads", params.get("threads")));
    Object.assign(state, { status: "ready", meta: model.meta });
    showModel(model);
    $("go").disabled = false;
    status(`Ready: loaded in ${(model.loadMs / 1e3).toFixed(2)} s.`);
    state.generate = generateFromQuery;
    if (params.has("prompt") || params.has("ids")) await generate(readSettings((name) => params.get(name)));
  } catch (err) { fail(err); }
}

async function generateFromQuery(query) {
  const params = new URLSearchParams(query);
  try { await generate(readSettings((name) => params.get(name))); } catch (err) { fail(err); }
  return { status: state.status, result: state.result, stats: state.stats, error: state.error };
}

main();
