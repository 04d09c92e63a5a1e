// Generation from a gptx ONNX export, shared by the web page (onnxruntime-web) and the Node example
// (onnxruntime-node). It imports nothing: the caller hands in the onnxruntime module (`ort`), the
// tokenizer library's `Tokenizer` class (@huggingface/tokenizers) and `readJson(name)`, which reads a
// file of the export folder, so the same code runs in a browser and in Node.
//
// The graph's I/O contract (gptx.decoder/1), B batch, T new tokens, P cached tokens:
//   input_ids [B, T], attention_mask [B, P+T], position_ids [B, T] (int64)
//   past_key_values.<layer>.<name> (each cache tensor the export declares) -> logits [B, T, V],
//   present.<layer>.<name> (the same tensor grown by T along its sequence axis)

export const IO_CONTRACT = "gptx.decoder";
export const IO_CONTRACT_VERSION = 1;
const BATCH = "batch_size";

// ---- metadata ------------------------------------------------------------------------------------

export function checkMeta(meta) {
  const contract = meta.io_contract || {};
  if (contract.name !== IO_CONTRACT || contract.version !== IO_CONTRACT_VERSION) {
    throw new Error(`gptx_export.json: I/O contract ${contract.name}/${contract.version} is not ${IO_CONTRACT}/${IO_CONTRACT_VERSION}`);
  }
  for (const key of ["n_layer", "vocab_size", "context_length"]) {
    if (!Number.isInteger(meta.model?.[key]) || meta.model[key] < 1) {
      throw new Error(`gptx_export.json: model.${key}: expected a positive integer, got ${JSON.stringify(meta.model?.[key])}`);
    }
  }
  const eot = meta.special_tokens?.eot;
  if (eot !== undefined && !(Number.isInteger(eot?.id) && eot.id >= 0 && eot.id < meta.model.vocab_size)) {
    throw new Error(`gptx_export.json: special_tokens.eot.id: expected an id below vocab_size ${meta.model.vocab_size}, got ${JSON.stringify(eot?.id)}`);
  }
  const tokens = meta.tokenizer?.vocab_size; // the tokenizer's own, below a padded model.vocab_size
  if (!Number.isInteger(tokens) || tokens < 1 || tokens > meta.model.vocab_size) {
    throw new Error(`gptx_export.json: tokenizer.vocab_size: expected a positive integer up to model.vocab_size ${meta.model.vocab_size}, got ${JSON.stringify(tokens)}`);
  }
  return meta;
}

// The cache tensors each layer keeps: gptx_export.json's `cache` declarations, or GPT-2's key and
// value [batch_size, kv_heads, past_sequence_length, head_dim] for exports that predate them.
export function cacheLayout(meta) {
  if (meta.cache === undefined) {
    const { kv_heads: K, head_dim: D } = meta.model;
    return ["key", "value"].map((name) => ({ name, dims: [BATCH, K, "past_sequence_length", D], seqAxis: 2, dtype: "float32" }));
  }
  if (!Array.isArray(meta.cache) || meta.cache.length === 0) throw new Error("gptx_export.json: cache: expected a list of tensor declarations");
  return meta.cache.map((entry, i) => cacheEntry(entry, `cache[${i}]`));
}

function cacheEntry(entry, where) {
  const { name, dims, seq_axis: seqAxis, dtype } = entry || {};
  const dimOk = (d) => (typeof d === "string" && d) || (Number.isInteger(d) && d >= 0);
  if (typeof name !== "string" || !/^[A-Za-z0-9_]+$/.test(name)) throw new Error(`gptx_export.json: ${where}.name: expected a plain name, got ${JSON.stringify(name)}`);
  if (!Array.isArray(dims) || !dims.every(dimOk)) throw new Error(`gptx_export.json: ${where}.dims: expected names and sizes, got ${JSON.stringify(dims)}`);
  if (!Number.isInteger(seqAxis) || seqAxis < 0 || seqAxis >= dims.length) throw new Error(`gptx_export.json: ${where}.seq_axis: expected an axis of dims, got ${JSON.stringify(seqAxis)}`);
  if (!(dtype in EMPTY_ARRAY)) throw new Error(`gptx_export.json: ${where}.dtype: ${JSON.stringify(dtype)} is not one of ${Object.keys(EMPTY_ARRAY).join(", ")}`);
  const unknown = dims.find((d, axis) => typeof d === "string" && d !== BATCH && axis !== seqAxis);
  if (unknown !== undefined) throw new Error(`gptx_export.json: ${where}.dims: unknown symbolic dimension ${JSON.stringify(unknown)} (${BATCH} or the sequence axis)`);
  return { name, dims, seqAxis, dtype };
}

// onnxruntime's typed array for each element type (float16 travels as raw 16-bit words)
const EMPTY_ARRAY = {
  float32: () => new Float32Array(0), float16: () => new Uint16Array(0), int8: () => new Int8Array(0),
  uint8: () => new Uint8Array(0), int32: () => new Int32Array(0), int64: () => new BigInt64Array(0),
};

// A past with no tokens in it: 0 along the sequence axis, B along batch_size, fixed sizes as declared.
function emptyPast(ort, entry, B) {
  const dims = entry.dims.map((d, axis) => (axis === entry.seqAxis ? 0 : d === BATCH ? B : d));
  return new ort.Tensor(entry.dtype, EMPTY_ARRAY[entry.dtype](), dims);
}

export function ioNames(nLayer, layout) {
  const per = (prefix) => Array.from({ length: nLayer }, (_, l) => layout.map((e) => `${prefix}.${l}.${e.name}`)).flat();
  return { past: per("past_key_values"), present: per("present") };
}

// ---- tokenizers ------------------------------------------------------------------------------------

// The ByteLevel pre-tokenizer's regex is GPT-2's (tiktoken's r50k) whatever the vocabulary.
// @huggingface/tokenizers 0.2 runs it as a JavaScript RegExp, whose \s takes U+FEFF and misses U+0085
// (tiktoken and the Rust library split otherwise); its Split pre-tokenizer translates \s to Unicode
// White_Space as they do. So the same split runs as Split + ByteLevel without its regex: the ids then
// equal the Rust library's (and tiktoken's gpt2) exactly. Only without a prefix space: ByteLevel would
// add one to every piece of the split.
const GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

function splitByteLevelRegex(pre) {
  if (!pre) return pre;
  if (pre.type === "Sequence") return { ...pre, pretokenizers: (pre.pretokenizers || []).map(splitByteLevelRegex) };
  if (pre.type !== "ByteLevel" || pre.use_regex === false || pre.add_prefix_space) return pre;
  const split = { type: "Split", pattern: { Regex: GPT2_SPLIT }, behavior: "Isolated", invert: false };
  return { type: "Sequence", pretokenizers: [split, { ...pre, use_regex: false }] };
}

// Any tokenizer.json an export carries (Tokenizer.tokenizer_json in gptx): encode without added
// special tokens and decode without clean-up, as gptx's Python does.
function hfTokenizer(Tokenizer, tokenizerJson, tokenizerConfig) {
  const described = { ...tokenizerJson, pre_tokenizer: splitByteLevelRegex(tokenizerJson.pre_tokenizer) };
  const tok = new Tokenizer(described, tokenizerConfig);
  return {
    encode: (text) => tok.encode(text, { add_special_tokens: false }).ids, // <|endoftext|> written in the text is one token, as in gptx
    decode: (ids) => (ids.length ? tok.decode(ids, { clean_up_tokenization_spaces: false }) : ""), // the library refuses []
  };
}

function charTokenizer(chars) {
  // the same rules as gptx's CharState schema: at least one character, each a single one, each once
  if (chars.length === 0) throw new Error("gptx_export.json: tokenizer.state.chars: expected at least one character");
  const index = new Map();
  chars.forEach((c, i) => {
    if (typeof c !== "string" || [...c].length !== 1) {
      throw new Error(`gptx_export.json: tokenizer.state.chars[${i}]: expected one character, got ${JSON.stringify(c)}`);
    }
    if (index.has(c)) throw new Error(`gptx_export.json: tokenizer.state.chars[${i}]: ${JSON.stringify(c)} is already id ${index.get(c)}`);
    index.set(c, i);
  });
  return {
    encode: (text) => Array.from(text, (c) => {
      if (!index.has(c)) throw new Error(`character ${JSON.stringify(c)} is not in this char tokenizer's vocabulary`);
      return index.get(c);
    }),
    decode: (ids) => ids.map((i) => chars[i]).join(""),
  };
}

function byteTokenizer() {
  const encoder = new TextEncoder();
  const decoder = new TextDecoder("utf-8"); // invalid sequences become U+FFFD, as Python's errors="replace"
  return {
    encode: (text) => Array.from(encoder.encode(text)),
    decode: (ids) => decoder.decode(Uint8Array.from(ids)),
  };
}

export async function buildTokenizer(meta, { Tokenizer, readJson }) {
  const info = meta.tokenizer || {};
  // char and byte in JavaScript: exact where the library is not (a character outside the char
  // vocabulary is an error, as in gptx); any other tokenizer through its tokenizer.json
  if (info.kind === "char" && Array.isArray(info.state?.chars)) return charTokenizer(info.state.chars);
  if (info.kind === "byte") return byteTokenizer();
  const files = meta.files || [];
  if (files.includes("tokenizer.json") || info.gpt2_bpe) { // gpt2_bpe: exports made before files listed it
    const config = files.includes("tokenizer_config.json") ? await readJson("tokenizer_config.json") : {};
    return hfTokenizer(Tokenizer, await readJson("tokenizer.json"), config);
  }
  throw new Error(`tokenizer '${info.kind}' has no tokenizer.json, which JavaScript needs (its Tokenizer.tokenizer_json() gives none)`);
}

// ---- sampling ----------------------------------------------------------------------------------------

// mulberry32: a small seeded generator, so a seed repeats a sampled text in JavaScript
function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(row) { // the first maximum, as numpy's argmax
  let best = 0;
  for (let v = 1; v < row.length; v++) if (row[v] > row[best]) best = v;
  return best;
}

// temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
// probability reaches p (nucleus) — the rules of gptx.sampling.Sampler.
export class Sampler {
  constructor({ temperature = 1, topK = null, topP = null, seed = null } = {}) {
    if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new Error(`temperature: expected a number >= 0, got ${temperature}`);
    if (topK !== null && !(Number.isInteger(topK) && topK >= 1)) throw new Error(`top_k: expected an integer >= 1, got ${topK}`);
    if (topP !== null && !(topP > 0 && topP <= 1)) throw new Error(`top_p: expected a number in (0, 1], got ${topP}`);
    Object.assign(this, { temperature, topK, topP });
    this.random = seed === null ? Math.random : seededRandom(seed);
  }

  next(logits) { // logits [V] -> token id
    if (this.temperature === 0) return argmax(logits);
    const z = Float32Array.from(logits, (x) => x / this.temperature); // [V]
    if (this.topK !== null && this.topK < z.length) {
      const kth = Float32Array.from(z).sort()[z.length - this.topK];
      for (let v = 0; v < z.length; v++) if (z[v] < kth) z[v] = -Infinity;
    }
    const probs = softmax(z); // [V]
    if (this.topP !== null && this.topP < 1) nucleus(probs, this.topP);
    return draw(probs, this.random());
  }
}

function softmax(z) {
  const max = z.reduce((m, x) => (x > m ? x : m), -Infinity);
  const p = new Float64Array(z.length);
  let sum = 0;
  for (let v = 0; v < z.length; v++) sum += p[v] = Math.exp(z[v] - max);
  for (let v = 0; v < z.length; v++) p[v] /= sum;
  return p;
}

function nucleus(probs, topP) { // zero every token outside the smallest set reaching topP (the top token always stays)
  const order = [];
  probs.forEach((p, v) => { if (p > 0) order.push(v); }); // zeros stay zero: sort only the rest
  order.sort((a, b) => probs[b] - probs[a] || a - b);
  let before = 0;
  for (const v of order) {
    const p = probs[v];
    if (before >= topP) probs[v] = 0;
    before += p;
  }
}

function draw(probs, u) { // the first token whose cumulative probability passes u * total
  let total = 0;
  for (const p of probs) total += p;
  let cdf = 0;
  for (let v = 0; v < probs.length; v++) {
    cdf += probs[v];
    if (cdf >= u * total) return v;
  }
  return probs.length - 1;
}

// ---- the decoder with its KV cache ---------------------------------------------------------------

function int64(ort, values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

// Prompts of different lengths, padded on the left so every row's next token lands in the same column.
function leftPad(prompts) {
  const T = Math.max(...prompts.map((p) => p.length));
  const ids = [], mask = [], pos = [];
  for (const p of prompts) {
    const pad = T - p.length;
    for (let t = 0; t < T; t++) {
      ids.push(t < pad ? 0 : p[t - pad]);
      mask.push(t < pad ? 0 : 1);
      pos.push(Math.max(t - pad, 0)); // 0 at each row's first real token
    }
  }
  return { ids, mask, pos, T };
}

export class Decoder {
  // `session` is an onnxruntime InferenceSession of model.onnx; `meta` is gptx_export.json.
  constructor(ort, session, meta) {
    this.ort = ort;
    this.session = session;
    this.meta = checkMeta(meta);
    this.layout = cacheLayout(meta);
    this.names = ioNames(meta.model.n_layer, this.layout);
    this.eot = meta.special_tokens?.eot ? meta.special_tokens.eot.id : null;
    this.checkGraph();
  }

  checkGraph() {
    const want = ["input_ids", "attention_mask", "position_ids", ...this.names.past].sort();
    const wantOut = ["logits", ...this.names.present].sort();
    const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
    if (!same([...this.session.inputNames].sort(), want) || !same([...this.session.outputNames].sort(), wantOut)) {
      throw new Error(`model.onnx: its inputs/outputs do not follow ${IO_CONTRACT}/${IO_CONTRACT_VERSION} with this cache layout`);
    }
  }

  checkLength(prompts, maxNewTokens) {
    if (!prompts.length || prompts.some((p) => p.length === 0)) throw new Error("a prompt must not be empty");
    if (!(Number.isInteger(maxNewTokens) && maxNewTokens >= 1)) throw new Error(`max_new_tokens: expected an integer >= 1, got ${maxNewTokens}`);
  }

  emptyCache(B) { // past_key_values.<layer>.<name> in ioNames' order: layer by layer, the layout's tensors in turn
    return Object.fromEntries(this.names.past.map((name, i) => [name, emptyPast(this.ort, this.layout[i % this.layout.length], B)]));
  }

  // Yields, after each step, the next token of every row [B]; the cache stays in onnxruntime tensors
  // (each step's presents are the next step's pasts). Past the context, as nanoGPT and gptx's Python
  // generators do, each new token sees the last context_length tokens: a prompt keeps its last
  // context_length - 1, and the window is run afresh every step, positions counted from its start.
  async *steps(prompts, maxNewTokens, sampler) {
    this.checkLength(prompts, maxNewTokens);
    const ctx = this.meta.model.context_length;
    const B = prompts.length, V = this.meta.model.vocab_size;
    const sampled = this.meta.tokenizer.vocab_size; // a padded vocabulary's extra ids (no token behind them) are never sampled
    const { ids, mask, pos, T } = leftPad(prompts.map((p) => p.slice(-Math.max(ctx - 1, 1))));
    const rowsIds = prompts.map((_, b) => ids.slice(b * T, (b + 1) * T)); // [B][S]: every token so far
    const rowsMask = prompts.map((_, b) => mask.slice(b * T, (b + 1) * T)); // [B][S], grows by one column per step
    let feeds = { input_ids: int64(this.ort, ids, [B, T]), attention_mask: int64(this.ort, mask, [B, T]),
                  position_ids: int64(this.ort, pos, [B, T]), ...this.emptyCache(B) };
    let lastPos = pos.filter((_, i) => i % T === T - 1);
    for (let step = 0; step < maxNewTokens; step++) {
      const out = await this.session.run(feeds);
      const t = out.logits.dims[1];
      const next = Array.from({ length: B }, (_, b) => sampler.next(out.logits.data.subarray((b * t + t - 1) * V, (b * t + t - 1) * V + sampled))); // [B]
      yield next;
      next.forEach((tok, b) => { rowsIds[b].push(tok); rowsMask[b].push(1); });
      const S = rowsMask[0].length;
      if (S <= ctx) { // the cache holds the whole context: feed the new token alone
        lastPos = lastPos.map((p) => p + 1);
        feeds = { input_ids: int64(this.ort, next, [B, 1]), attention_mask: int64(this.ort, rowsMask.flat(), [B, S]),
                  position_ids: int64(this.ort, lastPos, [B, 1]) };
        this.names.past.forEach((name, i) => { feeds[name] = out[this.names.present[i]]; });
      } else { // the last ctx tokens afresh, positions from the window's start (0 at its first real token)
        const windowMask = rowsMask.map((row) => row.slice(-ctx));
        const windowPos = windowMask.map((row) => { let seen = 0; return row.map((m) => Math.max((seen += m) - 1, 0)); });
        lastPos = windowPos.map((row) => row[row.length - 1]);
        feeds = { input_ids: int64(this.ort, rowsIds.map((row) => row.slice(-ctx)).flat(), [B, ctx]),
                  attention_mask: int64(this.ort, windowMask.flat(), [B, ctx]),
                  position_ids: int64(this.ort, windowPos.flat(), [B, ctx]), ...this.emptyCache(B) };
      }
    }
  }

  // Up to maxNewTokens new ids per prompt, each row closed at (and including) end-of-text, as
  // gptx's Python generators. onStep(next, ids) sees every step (for streaming); false from it stops.
  // stopAtEot false: every row runs maxNewTokens (a benchmark's fixed length, as eot_id=None in Python).
  async generate(prompts, maxNewTokens, sampler, onStep = () => {}, { stopAtEot = true } = {}) {
    const ids = prompts.map(() => []);
    const done = prompts.map(() => false);
    const eot = stopAtEot ? this.eot : null;
    for await (const next of this.steps(prompts, maxNewTokens, sampler)) {
      next.forEach((tok, b) => {
        if (done[b]) return;
        ids[b].push(tok);
        done[b] = eot !== null && tok === eot;
      });
      if ((await onStep(next, ids)) === false || done.every(Boolean)) break;
    }
    return { prompt_ids: prompts, ids };
  }
}

// Everything a runtime needs from an export folder: its metadata, tokenizer and decoder.
export async function loadExport({ ort, Tokenizer, readJson, modelLocation, sessionOptions = {} }) {
  const meta = checkMeta(await readJson("gptx_export.json"));
  const tokenizer = await buildTokenizer(meta, { Tokenizer, readJson });
  const session = await ort.InferenceSession.create(modelLocation, { graphOptimizationLevel: "all", ...sessionOptions });
  return { meta, tokenizer, decoder: new Decoder(ort, session, meta) };
}
