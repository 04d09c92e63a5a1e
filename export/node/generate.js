#!/usr/bin/env node
// Greedy generation from a gptx ONNX export with onnxruntime-node.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm install onnxruntime-node
//   node generate.js OUT_DIR --prompt "Hello" [--prompt "Another"] [--max-new-tokens 50] [--threads N]
//
// Prints one JSON object per prompt: {"prompt_ids": [...], "ids": [...], "text": "..."}.
// Reads OUT_DIR/gptx_export.json (model sizes, tokenizer, end-of-text token) and, for GPT-2's
// BPE, OUT_DIR/tokenizer.json. The graph's I/O contract (gptx.decoder/1):
//   input_ids [B, T], attention_mask [B, P+T], position_ids [B, T] (int64),
//   past_key_values.N.key/.value [B, K, P, D] -> logits [B, T, V], present.N.key/.value [B, K, P+T, D]
"use strict";

const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-node");

// ---- tokenizers ------------------------------------------------------------------------------

// GPT-2's byte-level BPE from a Hugging Face tokenizer.json (vocab + merges).
function gpt2Tokenizer(tokenizerJson) {
  const model = tokenizerJson.model;
  const encoder = model.vocab;
  const decoder = {};
  for (const [tok, id] of Object.entries(encoder)) decoder[id] = tok;
  const ranks = new Map();
  model.merges.forEach((m, i) => ranks.set(Array.isArray(m) ? m.join(" ") : m, i));
  const special = new Map((tokenizerJson.added_tokens || []).map((t) => [t.content, t.id]));

  // bytes <-> printable unicode characters, as GPT-2 maps them
  const byteToChar = {};
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  }
  bs.forEach((b, i) => { byteToChar[b] = String.fromCodePoint(cs[i]); });
  const charToByte = {};
  for (const [b, c] of Object.entries(byteToChar)) charToByte[c] = Number(b);

  const pattern = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
  const cache = new Map();

  function bpe(word) {
    if (cache.has(word)) return cache.get(word);
    let parts = Array.from(word);
    while (parts.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i < parts.length - 1; i++) {
        const r = ranks.get(parts[i] + " " + parts[i + 1]);
        if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
      }
      if (best < 0) break;
      const pair = [parts[best], parts[best + 1]];
      const merged = [];
      for (let i = 0; i < parts.length; ) {
        if (i < parts.length - 1 && parts[i] === pair[0] && parts[i + 1] === pair[1]) {
          merged.push(pair[0] + pair[1]); i += 2;
        } else { merged.push(parts[i]); i += 1; }
      }
      parts = merged;
    }
    cache.set(word, parts);
    return parts;
  }

  function encodeOrdinary(text, out) {
    for (const piece of text.match(pattern) || []) {
      const mapped = Array.from(Buffer.from(piece, "utf-8"), (b) => byteToChar[b]).join("");
      for (const tok of bpe(mapped)) out.push(encoder[tok]);
    }
  }

  return {
    encode(text) {
      const out = [];
      // special tokens written in the text (e.g. <|endoftext|>) are single tokens
      const names = Array.from(special.keys()).map((s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
      const parts = names.length ? text.split(new RegExp("(" + names.join("|") + ")")) : [text];
      for (const part of parts) {
        if (special.has(part)) out.push(special.get(part));
        else if (part) encodeOrdinary(part, out);
      }
      return out;
    },
    decode(ids) {
      const bytes = [];
      for (const id of ids) for (const ch of decoder[id] || "") bytes.push(charToByte[ch]);
      return Buffer.from(bytes).toString("utf-8");
    },
  };
}

function loadTokenizer(dir, meta) {
  const tok = meta.tokenizer;
  if (tok.gpt2_bpe) {
    return gpt2Tokenizer(JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf-8")));
  }
  if (tok.kind === "char") {
    const chars = tok.state.chars;
    const index = new Map(chars.map((c, i) => [c, i]));
    return {
      encode: (text) => Array.from(text, (c) => {
        if (!index.has(c)) throw new Error(`character ${JSON.stringify(c)} is not in this char tokenizer's vocabulary`);
        return index.get(c);
      }),
      decode: (ids) => ids.map((i) => chars[i]).join(""),
    };
  }
  if (tok.kind === "byte") {
    return {
      encode: (text) => Array.from(Buffer.from(text, "utf-8")),
      decode: (ids) => Buffer.from(ids).toString("utf-8"),
    };
  }
  throw new Error(`tokenizer '${tok.kind}' has no JavaScript implementation in this example`);
}

// ---- generation ------------------------------------------------------------------------------

function int64(values, dims) {
  return new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
}

async function generate(dir, prompts, maxNewTokens, threads) {
  const meta = JSON.parse(fs.readFileSync(path.join(dir, "gptx_export.json"), "utf-8"));
  if (meta.io_contract.name !== "gptx.decoder" || meta.io_contract.version !== 1) {
    throw new Error(`${dir}: I/O contract ${meta.io_contract.name}/${meta.io_contract.version} is not gptx.decoder/1`);
  }
  const tokenizer = loadTokenizer(dir, meta);
  const { n_layer: L, kv_heads: K, head_dim: D, vocab_size: V, context_length: ctx } = meta.model;
  const eot = meta.special_tokens.eot ? meta.special_tokens.eot.id : null;
  const options = { executionProviders: ["cpu"], graphOptimizationLevel: "all" };
  if (threads) options.intraOpNumThreads = threads;
  const session = await ort.InferenceSession.create(path.join(dir, "model.onnx"), options);

  const promptIds = prompts.map((p) => tokenizer.encode(p));
  if (promptIds.some((p) => p.length === 0)) throw new Error("a prompt must not be empty");
  const B = promptIds.length;
  const T = Math.max(...promptIds.map((p) => p.length));
  if (T + maxNewTokens > ctx) {
    throw new Error(`prompt of ${T} tokens + ${maxNewTokens} new tokens exceeds the model's context of ${ctx} tokens`);
  }
  // left padding: every row's next token lands in the same column
  let ids = [], mask = [], pos = [];
  for (const p of promptIds) {
    const pad = T - p.length;
    for (let t = 0; t < T; t++) {
      ids.push(t < pad ? 0 : p[t - pad]);
      mask.push(t < pad ? 0 : 1);
      pos.push(Math.max(t - pad, 0));
    }
  }
  const fullMask = mask.slice();
  let feeds = { input_ids: int64(ids, [B, T]), attention_mask: int64(mask, [B, T]), position_ids: int64(pos, [B, T]) };
  const empty = new ort.Tensor("float32", new Float32Array(0), [B, K, 0, D]);
  for (let i = 0; i < L; i++) {
    feeds[`past_key_values.${i}.key`] = empty;
    feeds[`past_key_values.${i}.value`] = empty;
  }
  const out = promptIds.map(() => []);
  const done = promptIds.map(() => false);
  let lastPos = promptIds.map((p) => p.length - 1);
  let width = T;
  for (let step = 0; step < maxNewTokens; step++) {
    const results = await session.run(feeds);
    const logits = results.logits; // [B, t, V]
    const t = logits.dims[1];
    const next = [];
    for (let b = 0; b < B; b++) {
      const row = logits.data.subarray((b * t + t - 1) * V, (b * t + t) * V);
      let best = 0;
      for (let v = 1; v < V; v++) if (row[v] > row[best]) best = v; // first maximum, as numpy's argmax
      next.push(best);
      if (!done[b]) {
        out[b].push(best);
        done[b] = eot !== null && best === eot;
      }
    }
    if (done.every(Boolean)) break;
    width += 1;
    for (let b = 0; b < B; b++) fullMask.splice(b * width + width - 1, 0, 1);
    lastPos = lastPos.map((p) => p + 1);
    feeds = { input_ids: int64(next, [B, 1]), attention_mask: int64(fullMask, [B, width]), position_ids: int64(lastPos, [B, 1]) };
    for (let i = 0; i < L; i++) { // the cache stays in onnxruntime tensors: present -> past
      feeds[`past_key_values.${i}.key`] = results[`present.${i}.key`];
      feeds[`past_key_values.${i}.value`] = results[`present.${i}.value`];
    }
  }
  return promptIds.map((p, b) => ({ prompt_ids: p, ids: out[b], text: tokenizer.decode(out[b]) }));
}

function parseArgs(argv) {
  const args = { dir: null, prompts: [], maxNewTokens: 50, threads: 0 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--prompt") args.prompts.push(argv[++i]);
    else if (a === "--max-new-tokens") args.maxNewTokens = parseInt(argv[++i], 10);
    else if (a === "--threads") args.threads = parseInt(argv[++i], 10);
    else if (a === "-h" || a === "--help") args.help = true;
    else if (args.dir === null) args.dir = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.help || !args.dir || args.prompts.length === 0 || !(args.maxNewTokens >= 1)) {
    console.error("usage: node generate.js OUT_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--threads N]");
    process.exit(args.help ? 0 : 2);
  }
  for (const r of await generate(args.dir, args.prompts, args.maxNewTokens, args.threads)) {
    console.log(JSON.stringify(r));
  }
}

if (require.main === module) {
  main().catch((err) => { console.error(`Error: ${err.message}`); process.exit(2); });
}

module.exports = { generate, gpt2Tokenizer, loadTokenizer };
