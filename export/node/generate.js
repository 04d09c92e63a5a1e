#!/usr/bin/env node
// Generation from a gptx ONNX export with onnxruntime-node.
//
//   ONNXRUNTIME_NODE_INSTALL=skip npm install        # onnxruntime-node (CPU) + @huggingface/tokenizers
//   node generate.js OUT_DIR --prompt "Hello" [--prompt "Another"] [--max-new-tokens 50] [--threads N]
//                    [--temperature 0] [--top-k K] [--top-p P] [--seed S]
//
// Prints one JSON object per prompt: {"prompt_ids": [...], "ids": [...], "text": "..."}. Several
// prompts run as one left-padded batch. Greedy by default (temperature 0). The reading of
// gptx_export.json, the tokenizers, the decode loop with its KV cache and the sampling live in
// ../web/gptx.mjs, the module the web page (gptx web) runs too.
"use strict";

const fs = require("fs");
const path = require("path");
const { pathToFileURL } = require("url");

const USAGE = "usage: node generate.js OUT_DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--threads N] " +
  "[--temperature T] [--top-k K] [--top-p P] [--seed S]";

function parseArgs(argv) {
  const args = { dir: null, prompts: [], maxNewTokens: 50, threads: 0, temperature: 0, topK: null, topP: null, seed: null };
  const number = (flag, text, integer) => {
    const v = Number(text);
    if (text === undefined || text.trim() === "" || !Number.isFinite(v) || (integer && !Number.isInteger(v))) {
      throw new Error(`${flag}: expected ${integer ? "an integer" : "a number"}, got ${JSON.stringify(text)}`);
    }
    return v;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--prompt") args.prompts.push(argv[++i]);
    else if (a === "--max-new-tokens") args.maxNewTokens = number(a, argv[++i], true);
    else if (a === "--threads") args.threads = number(a, argv[++i], true);
    else if (a === "--temperature") args.temperature = number(a, argv[++i], false);
    else if (a === "--top-k") args.topK = number(a, argv[++i], true);
    else if (a === "--top-p") args.topP = number(a, argv[++i], false);
    else if (a === "--seed") args.seed = number(a, argv[++i], true);
    else if (a === "-h" || a === "--help") args.help = true;
    else if (args.dir === null && !a.startsWith("--")) args.dir = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  return args;
}

async function generate(dir, prompts, { maxNewTokens = 50, threads = 0, ...sampling } = {}) {
  const ort = require("onnxruntime-node");
  const { Tokenizer } = require("@huggingface/tokenizers");
  const gptx = await import(pathToFileURL(path.join(__dirname, "..", "web", "gptx.mjs")).href);
  const regular = (file) => { // a FIFO or device would block or never end, as gptx's Python side refuses
    if (!fs.statSync(file).isFile()) throw new Error(`${file}: is not a regular file (a FIFO, socket or device, which would block or never end)`);
    return file;
  };
  const readJson = (name) => JSON.parse(fs.readFileSync(regular(path.join(dir, name)), "utf-8"));
  const sessionOptions = { executionProviders: ["cpu"], ...(threads ? { intraOpNumThreads: threads } : {}) };
  const { tokenizer, decoder } = await gptx.loadExport({ ort, Tokenizer, readJson, modelLocation: regular(path.join(dir, "model.onnx")), sessionOptions });
  const promptIds = prompts.map((p) => tokenizer.encode(p));
  const result = await decoder.generate(promptIds, maxNewTokens, new gptx.Sampler(sampling));
  return promptIds.map((p, b) => ({ prompt_ids: p, ids: result.ids[b], text: tokenizer.decode(result.ids[b]) }));
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.help || !args.dir || args.prompts.length === 0) {
    console.error(USAGE);
    process.exit(args.help ? 0 : 2);
  }
  if (!fs.existsSync(path.join(args.dir, "gptx_export.json"))) throw new Error(`${args.dir}: not a gptx export (no gptx_export.json)`);
  const { dir, prompts, ...options } = args;
  for (const row of await generate(dir, prompts, options)) console.log(JSON.stringify(row));
}

if (require.main === module) {
  main().catch((err) => { console.error(`Error: ${err.message}`); process.exit(2); });
}

module.exports = { generate };
