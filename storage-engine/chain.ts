/**
 * A chain is the list of layers a volume or snapshot reads through, topmost first. These functions
 * answer the three questions asked of a chain: what a byte range reads as, which blocks are
 * allocated, and which blocks a run of layers changed.
 */
import { Bitmap, clipBelow, unionOf } from './bitmap.js';
import type { Layer } from './layer.js';

/** The topmost layer answering for `block`: a layer holding data, null for zeros (trimmed or never written). */
function ownerOf(chain: readonly Layer[], block: number): Layer | null {
  for (const layer of chain) {
    if (layer.written.has(block)) return layer;
    if (layer.trimmed.has(block)) return null;
  }
  return null;
}

/** Reads [offset, offset + length) through the chain; consecutive blocks with one owner are one pread. */
export function readThrough(chain: readonly Layer[], blockSize: number, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  readThroughInto(chain, blockSize, offset, out, 0, length);
  return out;
}

/** Like readThrough, into an existing buffer (which must be zeroed where the range reads zeros). */
export function readThroughInto(
  chain: readonly Layer[],
  blockSize: number,
  offset: number,
  target: Uint8Array,
  targetOffset: number,
  length: number,
): void {
  const end = offset + length;
  let pos = offset;
  if (length === 0) return;
  const lastBlock = Math.floor((end - 1) / blockSize);
  while (pos < end) {
    const block = Math.floor(pos / blockSize);
    const owner = ownerOf(chain, block);
    let next = block + 1;
    while (next <= lastBlock && ownerOf(chain, next) === owner) next++;
    const segmentEnd = Math.min(end, next * blockSize);
    if (owner) owner.readInto(target, targetOffset + (pos - offset), segmentEnd - pos, pos);
    else target.fill(0, targetOffset + (pos - offset), targetOffset + (segmentEnd - offset));
    pos = segmentEnd;
  }
}

/** Blocks whose topmost entry in the chain is a write (not a trim), below `blockLimit`. */
export function allocatedBlocks(chain: readonly Layer[], blockLimit: number): Bitmap {
  const result = new Bitmap();
  // Blocks some layer above already answered for; a lower layer's entries for them are hidden.
  let covered: Bitmap | undefined;
  for (let i = 0; i < chain.length; i++) {
    const layer = chain[i]!;
    const last = i === chain.length - 1;
    if (!layer.written.isEmpty) result.orInPlace(covered ? Bitmap.andNot(layer.written, covered) : layer.written);
    if (last) break;
    // Copies only where needed: each one costs per container, and most layers are small.
    covered ??= new Bitmap();
    if (!layer.written.isEmpty) covered.orInPlace(layer.written);
    if (!layer.trimmed.isEmpty) covered.orInPlace(layer.trimmed);
  }
  return clipBelow(result, blockLimit);
}

/** Blocks written or trimmed by any of the given layers (the layers after a base, up to a target). */
export function changedBlocks(layers: readonly Layer[], blockLimit: number): Bitmap {
  const result = unionOf(layers.flatMap((l) => [l.written, l.trimmed]));
  return clipBelow(result, blockLimit);
}
