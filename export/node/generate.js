#!/usr/bin/env node
// Generation from a gptx ONNX export with onnxruntime-node.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm install        # onnxruntime-node (CPU) + @huggingface/tokenizers
//   node generate.js OUT_DIR --prompt "Hello" [--prompt "Another"] [--max-new-tokens 50] [--threads N]
//                    [--spin] [--temperature 0] [--top-k K] [--top-p P] [--seed S]
//
// Prints one JSON object per prompt: {"prompt_ids": [...], "ids": [...], "text": "..."}. Several
// prompts run as one left-padded batch. Greedy by default (temperature 0). The reading of
// gptx_export.json, the tokenizers, the decode loop with its KV cache and the sampling live in
// ../web/gptx.mjs, the module the web page (gptx web) runs too.
"use strict";

const fs = require("fs");
const path = require("path");
const { pathToFileURL } = require("url");

const USAGE = "usage: node generate.js OUT_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--threads N] [--spin] " +
  "[--temperature T] [--top-k K] [--top-p P] [--seed S]";

// The flags that take a value, each with its check: a missing value (the end of the line, or the
// next flag) or one outside its range is one "Error: FLAG: ..." line and exit 2, never a crash later.
const MAX_SEED = Number.MAX_SAFE_INTEGER;
const FLAGS = {
  "--prompt": { key: "prompts", parse: (flag, text) => nonEmpty(flag, text) },
  "--max-new-tokens": { key: "maxNewTokens", parse: (flag, text) => integer(flag, text, 1, 1 << 24) },
  "--threads": { key: "threads", parse: (flag, text) => integer(flag, text, 0, 4096) },
  "--temperature": { key: "temperature", parse: (flag, text) => number(flag, text, (v) => v >= 0 && v <= 1e4, "in [0, 10000]") },
  "--top-k": { key: "topK", parse: (flag, text) => integer(flag, text, 1, 1 << 24) },
  "--top-p": { key: "topP", parse: (flag, text) => number(flag, text, (v) => v > 0 && v <= 1, "in (0, 1]") },
  "--seed": { key: "seed", parse: (flag, text) => integer(flag, text, 0, MAX_SEED) },
};

function nonEmpty(flag, text) {
  if (text === "") throw new Error(`${flag}: a prompt must not be empty`);
  return text;
}

function number(flag, text, inRange, range) {
  const v = Number(text);
  if (text.trim() === "" || !Number.isFinite(v)) throw new Error(`${flag}: expected a number, got ${JSON.stringify(text)}`);
  if (!inRange(v)) throw new Error(`${flag}: must be a number ${range}, got ${text}`);
  return v;
}

function integer(flag, text, low, high) {
  if (!/^\s*[+-]?\d+\s*$/.test(text)) throw new Error(`${flag}: expected an integer, got ${JSON.stringify(text)}`);
  const v = Number(text);
  if (!(v >= low && v <= high)) throw new Error(`${flag}: must be an integer from ${low} to ${high}, got ${text.trim()}`);
  return v;
}

function parseArgs(argv) {
  const args = { dir: null, prompts: [], maxNewTokens: 50, threads: 0, spin: false, temperature: 0, topK: null, topP: null, seed: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const [name, inline] = a.startsWith("--") && a.includes("=") ? [a.slice(0, a.indexOf("=")), a.slice(a.indexOf("=") + 1)] : [a, undefined];
    const flag = FLAGS[name];
    if (flag) {
      let text = inline;
      if (text === undefined) {
        text = argv[++i];
        // a prompt may start with "-" (a dash, a negative number); a flag of ours never is a value
        if (text === undefined || (text.startsWith("--") && text.split("=")[0] in FLAGS)) {
          throw new Error(`${name}: expects a value${name === "--prompt" ? " (the prompt text)" : ""}`);
        }
      }
      const value = flag.parse(name, text);
      if (flag.key === "prompts") args.prompts.push(value);
      else args[flag.key] = value;
    } else if (a === "--spin") args.spin = true;
    else if (a === "-h" || a === "--help") args.help = true;
    else if (args.dir === null && !a.startsWith("-")) args.dir = a;
    else if (a.startsWith("-")) throw new Error(`${a}: no such option (${USAGE})`);
    else throw new Error(`unexpected argument ${JSON.stringify(a)}: OUT_DIR is ${JSON.stringify(args.dir)} already (${USAGE})`);
  }
  return args;
}

// The export in `dir` ready to decode: { ort, gptx (../web/gptx.mjs), meta, tokenizer, decoder }.
// bench.js loads through here too, so it times what this example runs.
async function load(dir, threads = 0, spin = false) {
  const ort = require("onnxruntime-node");
  const { Tokenizer } = require("@huggingface/tokenizers");
  const gptx = await import(pathToFileURL(path.join(__dirname, "..", "web", "gptx.mjs")).href);
  const regular = (file) => { // a FIFO or device would block or never end, as gptx's Python side refuses
    if (!fs.statSync(file).isFile()) throw new Error(`${file}: is not a regular file (a FIFO, socket or device, which would block or never end)`);
    return file;
  };
  const readJson = (name) => JSON.parse(fs.readFileSync(regular(path.join(dir, name)), "utf-8"));
  // idle onnxruntime threads sleep instead of spinning unless --spin: spinning threads starve any
  // neighbour on a shared machine; on CPUs of its own (what gptx's Python sessions check before
  // they spin) spinning decodes faster (docs/deploy.md has the figures)
  const spinning = { session: { intra_op: { allow_spinning: spin ? "1" : "0" }, inter_op: { allow_spinning: "0" } } };
  const sessionOptions = { executionProviders: ["cpu"], extra: spinning, ...(threads ? { intraOpNumThreads: threads } : {}) };
  return { ort, gptx, ...(await gptx.loadExport({ ort, Tokenizer, readJson, modelLocation: regular(path.join(dir, "model.onnx")), sessionOptions })) };
}

async function generate(dir, prompts, { maxNewTokens = 50, threads = 0, spin = false, ...sampling } = {}) {
  const { gptx, tokenizer, decoder } = await load(dir, threads, spin);
  const promptIds = prompts.map((p) => tokenizer.encode(p));
  const result = await decoder.generate(promptIds, maxNewTokens, new gptx.Sampler(sampling));
  return promptIds.map((p, b) => ({ prompt_ids: p, ids: result.ids[b], text: tokenizer.decode(result.ids[b]) }));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (!args.dir) throw new Error(`OUT_DIR: missing: the export folder to generate from (${USAGE})`);
  if (args.prompts.length === 0) throw new Error(`--prompt: missing: give at least one prompt (${USAGE})`);
  if (!fs.existsSync(path.join(args.dir, "gptx_export.json"))) throw new Error(`${args.dir}: not a gptx export (no gptx_export.json)`);
  const { dir, prompts, ...options } = args;
  for (const row of await generate(dir, prompts, options)) console.log(JSON.stringify(row));
}

// Node's own messages can run to several lines (a missing package lists its require stack): the first says what.
function oneLine(err) {
  if (err && err.code === "MODULE_NOT_FOUND") {
    const name = (String(err.message).match(/'([^']+)'/) || [])[1] || "a package";
    return `${name} is not installed: ONNXRUNTIME_NODE_INSTALL=skip npm install (in ${__dirname}), or set NODE_PATH`;
  }
  const text = String((err && err.message) || err).trim();
  return text.split("\n")[0] || String(err);
}

if (require.main === module) {
  main().catch((err) => { console.error(`Error: ${oneLine(err)}`); process.exit(2); });
}

module.exports = { generate, load, integer, oneLine };
