// Greedy generation of an exported encoder_decoder or encoder_text_decoder model
// in ONNX Runtime, with its KV cache: node generate.js EXPORT_DIR REQUEST.json OUTPUT.json
// REQUEST.json: {"images": {"type": "float32", "dims": [B, 3, H, W], "data"},
//                "context_ids": [[...], ...] (encoder_text_decoder only),
//                "input_ids": [[...], ...] (equal lengths), "max_new_tokens": N,
//                "stop_at_eos": false}
// OUTPUT.json: {"tokens": [[...], ...], "prefill_logits": {...}, "seconds": s}
'use strict';
const fs = require('fs');
const path = require('path');
const { ort, toTensor, fromTensor, session } = require('./common');

function argmaxLast(logits) {
  // logits [B, T, V] -> the argmax of each row's last position
  const [b, t, v] = logits.dims;
  const out = [];
  for (let i = 0; i < b; i++) {
    const base = (i * t + (t - 1)) * v;
    let best = 0;
    for (let j = 1; j < v; j++) if (logits.data[base + j] > logits.data[base + best]) best = j;
    out.push(best);
  }
  return out;
}

async function main() {
  const [dir, requestPath, outputPath] = process.argv.slice(2);
  if (!outputPath) throw new Error('usage: node generate.js EXPORT_DIR REQUEST.json OUTPUT.json');
  const spec = JSON.parse(fs.readFileSync(path.join(dir, 'export.json'), 'utf8'));
  const withText = spec.architecture === 'encoder_text_decoder';
  if (spec.architecture !== 'encoder_decoder' && !withText) {
    throw new Error(`generate.js drives encoder_decoder and encoder_text_decoder exports, not ${spec.architecture}`);
  }
  const req = JSON.parse(fs.readFileSync(requestPath, 'utf8'));
  const ids = req.input_ids;
  const batch = ids.length;
  const length = ids[0].length;
  if (ids.some((r) => r.length !== length)) throw new Error('input_ids rows must have equal lengths');
  const started = Date.now();
  const [vision, embed, prefill, decode] = await Promise.all(
    [withText ? 'encode' : 'vision', 'embed', 'prefill', 'decode'].map((g) => session(dir, g)));
  let imageEmbeds;
  let memoryMask = null;  // encoder_text_decoder: true marks padded context positions of the memory
  if (withText) {
    const ctx = req.context_ids;
    if (!ctx || ctx.length !== batch || ctx.some((r) => r.length !== ctx[0].length)) {
      throw new Error('context_ids: one row per image, of equal lengths (pad with 0)');
    }
    const enc = await vision.run({ images: toTensor(req.images),
                                   context_ids: toTensor({ type: 'int64', dims: [batch, ctx[0].length], data: ctx.flat() }) });
    imageEmbeds = enc.image_embeds;
    memoryMask = enc.memory_mask;
  } else {
    imageEmbeds = (await vision.run({ images: toTensor(req.images) })).image_embeds;
  }
  const idTensor = toTensor({ type: 'int64', dims: [batch, length], data: ids.flat() });
  const embeds = (await embed.run({ input_ids: idTensor })).inputs_embeds;
  const d = embeds.dims[2];
  let prefillFeeds;
  if (spec.fusion === 'concat') {
    // Each row's <image> embedding is replaced by the row's (unpadded) memory.
    const m = imageEmbeds.dims[1];
    const valid = (b) => Array.from({ length: m }, (_, k) => k).filter((k) => !memoryMask || !memoryMask.data[b * m + k]);
    const keep = Array.from({ length: batch }, (_, b) => valid(b));
    if (keep.some((k) => k.length !== keep[0].length)) {
      throw new Error('rows whose contexts hold different numbers of tokens: run them one per call');
    }
    const total = length - 1 + keep[0].length;
    const data = new Float32Array(batch * total * d);
    for (let b = 0; b < batch; b++) {
      const at = ids[b].indexOf(spec.image_token_id);
      if (at < 0) throw new Error(`input_ids row ${b} has no <image> token (${spec.image_token_id})`);
      if (ids[b].indexOf(spec.image_token_id, at + 1) >= 0) throw new Error(`input_ids row ${b} has two <image> tokens`);
      const row = b * total * d;
      data.set(embeds.data.subarray(b * length * d, (b * length + at) * d), row);
      keep[b].forEach((k, j) => data.set(imageEmbeds.data.subarray((b * m + k) * d, (b * m + k + 1) * d),
                                         row + (at + j) * d));
      data.set(embeds.data.subarray((b * length + at + 1) * d, (b + 1) * length * d),
               row + (at + keep[b].length) * d);
    }
    prefillFeeds = { inputs_embeds: new ort.Tensor('float32', data, [batch, total, d]) };
  } else {
    prefillFeeds = { inputs_embeds: embeds, image_embeds: imageEmbeds };
    if (memoryMask) prefillFeeds.memory_mask = memoryMask;
  }
  let out = await prefill.run(prefillFeeds);
  const prefillLogits = fromTensor(out.logits);
  const tokens = Array.from({ length: batch }, () => []);
  const done = new Array(batch).fill(false);
  for (let step = 0; step < req.max_new_tokens; step++) {
    const next = argmaxLast(out.logits);
    next.forEach((t, b) => { if (!done[b]) tokens[b].push(t); if (req.stop_at_eos && t === spec.eos_id) done[b] = true; });
    if (step + 1 === req.max_new_tokens || done.every(Boolean)) break;
    const feeds = { input_ids: new ort.Tensor('int64', BigInt64Array.from(next.map(BigInt)), [batch, 1]) };
    for (let i = 0; i < spec.depth; i++) {
      feeds[`past.${i}.key`] = out[`present.${i}.key`];
      feeds[`past.${i}.value`] = out[`present.${i}.value`];
    }
    if (spec.fusion !== 'concat') {
      feeds.image_embeds = imageEmbeds;
      if (memoryMask) feeds.memory_mask = memoryMask;
    }
    out = await decode.run(feeds);
  }
  fs.writeFileSync(outputPath, JSON.stringify({ tokens, prefill_logits: prefillLogits,
                                                seconds: (Date.now() - started) / 1000 }));
}

main().catch((e) => { console.error(`generate.js: ${e.message}`); process.exit(1); });
