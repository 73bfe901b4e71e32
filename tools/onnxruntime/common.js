// Shared helpers: tensors to and from JSON ({"type", "dims", "data"}), sessions.
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

function toTensor(spec) {
  const { type, dims, data } = spec;
  if (type === 'float32') return new ort.Tensor('float32', Float32Array.from(data), dims);
  if (type === 'int64') return new ort.Tensor('int64', BigInt64Array.from(data.map((v) => BigInt(v))), dims);
  if (type === 'bool') return new ort.Tensor('bool', Uint8Array.from(data.map((v) => (v ? 1 : 0))), dims);
  throw new Error(`unsupported tensor type ${type} (float32, int64 or bool)`);
}

function fromTensor(t) {
  const data = t.type === 'int64' ? Array.from(t.data, (v) => Number(v))
    : t.type === 'bool' ? Array.from(t.data, (v) => Boolean(v)) : Array.from(t.data);
  return { type: t.type, dims: Array.from(t.dims), data };
}

async function session(dir, name) {
  const spec = JSON.parse(fs.readFileSync(path.join(dir, 'export.json'), 'utf8'));
  const graph = spec.graphs[name];
  if (!graph) throw new Error(`${dir}/export.json has no graph '${name}' (has ${Object.keys(spec.graphs)})`);
  return ort.InferenceSession.create(path.join(dir, graph.file), { intraOpNumThreads: 2 });
}

module.exports = { ort, toTensor, fromTensor, session };
