#!/usr/bin/env node
// Timing of the Node example's decoding, measured inside Node (process start-up and loading are
// not generation time): what `gptx bench --only generate --backends node` runs.
//
//   node bench.js OUT_DIR --ids 464,2068,7586 [--new-tokens 128] [--repeats 3] [--threads N] [--spin]
//   node bench.js --check        # exit 0 when onnxruntime-node and @huggingface/tokenizers load
//
// Greedy, batch 1, exactly --new-tokens tokens (no stop at end-of-text, as gptx bench's other
// backends): after one warm-up generation (its ids are printed, for comparison with PyTorch's),
// first-token latency (prefill and one sample) max(3, repeats) times, then whole generations
// --repeats times. Prints one JSON object: ids, load_ms, ttft_ms [...], total_ms [...], peak_rss_growth_mib.
"use strict";

const { load, integer, oneLine } = require("./generate.js");

const USAGE = "usage: node bench.js OUT_DIR --ids ID,ID,... [--new-tokens N] [--repeats R] [--threads N] [--spin] | node bench.js --check";

function parseArgs(argv) {
  const args = { dir: null, ids: null, newTokens: 128, repeats: 3, threads: 0, spin: false, check: false };
  const value = (i, flag) => {
    if (argv[i] === undefined || argv[i].startsWith("--")) throw new Error(`${flag}: expects a value (${USAGE})`);
    return argv[i];
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--check") args.check = true;
    else if (a === "--spin") args.spin = true;
    else if (a === "--ids") args.ids = value(++i, a).split(",").map((t) => integer(a, t, 0, 2 ** 31 - 1));
    else if (a === "--new-tokens") args.newTokens = integer(a, value(++i, a), 1, 1 << 20);
    else if (a === "--repeats") args.repeats = integer(a, value(++i, a), 1, 1000);
    else if (a === "--threads") args.threads = integer(a, value(++i, a), 0, 4096);
    else if (args.dir === null && !a.startsWith("-")) args.dir = a;
    else throw new Error(`${a}: unexpected argument (${USAGE})`);
  }
  return args;
}

// Exactly n greedy ids after `ids` (the decoder's steps, which do not stop at end-of-text).
async function greedy(decoder, sampler, ids, n) {
  const got = [];
  for await (const next of decoder.steps([ids], n, sampler)) got.push(next[0]);
  return got;
}

async function timed(fn) {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.check) {
    require("onnxruntime-node");
    require("@huggingface/tokenizers");
    return;
  }
  if (!args.dir || !args.ids || args.ids.length === 0) throw new Error(`OUT_DIR and --ids are required (${USAGE})`);
  const rssBefore = process.memoryUsage().rss;
  const t = performance.now();
  const { gptx, decoder } = await load(args.dir, args.threads, args.spin);
  const loadMs = performance.now() - t;
  const sampler = new gptx.Sampler({ temperature: 0 });
  const ids = await greedy(decoder, sampler, args.ids, args.newTokens); // warm-up
  const ttft = [];
  for (let r = 0; r < Math.max(3, args.repeats); r++) ttft.push(await timed(() => greedy(decoder, sampler, args.ids, 1)));
  const total = [];
  for (let r = 0; r < args.repeats; r++) total.push(await timed(() => greedy(decoder, sampler, args.ids, args.newTokens)));
  // RSS growth from before loading to the peak, as gptx bench reports for its Python backends
  const growthMib = Math.max(0, process.resourceUsage().maxRSS * 1024 - rssBefore) / 2 ** 20; // maxRSS in kilobytes
  console.log(JSON.stringify({ ids, load_ms: loadMs, ttft_ms: ttft, total_ms: total, peak_rss_growth_mib: growthMib }));
}

if (require.main === module) {
  main().catch((err) => { console.error(`Error: ${oneLine(err)}`); process.exit(2); });
}
