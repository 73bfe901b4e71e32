// Runs one exported graph: node run.js EXPORT_DIR GRAPH INPUTS.json OUTPUTS.json
// INPUTS.json maps input names to {"type": "float32" | "int64", "dims", "data"}.
'use strict';
const fs = require('fs');
const { toTensor, fromTensor, session } = require('./common');

async function main() {
  const [dir, graph, inputsPath, outputsPath] = process.argv.slice(2);
  if (!outputsPath) throw new Error('usage: node run.js EXPORT_DIR GRAPH INPUTS.json OUTPUTS.json');
  const s = await session(dir, graph);
  const given = JSON.parse(fs.readFileSync(inputsPath, 'utf8'));
  const feeds = {};
  for (const name of s.inputNames) {
    if (!(name in given)) throw new Error(`graph '${graph}' needs input '${name}'`);
    feeds[name] = toTensor(given[name]);
  }
  const results = await s.run(feeds);
  const out = {};
  for (const name of s.outputNames) out[name] = fromTensor(results[name]);
  fs.writeFileSync(outputsPath, JSON.stringify(out));
}

main().catch((e) => { console.error(`run.js: ${e.message}`); process.exit(1); });
