/**
 * A chain is the list of layers a volume or snapshot reads through, topmost first. These functions answer
 * the questions asked of a whole chain: which blocks are allocated, which blocks a run of layers changed,
 * and which layer answers for each block (the location index a chain's reads go through).
 */
import { Bitmap, clipBelow, runsOf, unionOf } from './bitmap.js';
import type { Layer } from './layer.js';
import { LocationIndex } from './location-index.js';

/** Layers from `top` down to the root. */
export function chainOf(top: number | null, layers: ReadonlyMap<number, Layer>): Layer[] {
  const chain: Layer[] = [];
  for (let id = top; id !== null; ) {
    const layer = layers.get(id);
    if (!layer) throw new Error(`internal: layer ${id} is not loaded`);
    chain.push(layer);
    id = layer.parentId;
  }
  return chain;
}

/** Blocks whose topmost entry in the chain is a write (not a trim), below `blockLimit`. */
export function allocatedBlocks(chain: readonly Layer[], blockLimit: number): Bitmap {
  const result = new Bitmap();
  forEachVisible(chain, (_layer, visible) => {
    if (!visible.isEmpty) result.orInPlace(visible);
  });
  return clipBelow(result, blockLimit);
}

/** Blocks written or trimmed by any of the given layers (the layers after a base, up to a target). */
export function changedBlocks(layers: readonly Layer[], blockLimit: number): Bitmap {
  const result = unionOf(layers.flatMap((l) => [l.written, l.trimmed]));
  return clipBelow(result, blockLimit);
}

/** The location index of a chain: each block's topmost writing layer (trimmed and unwritten blocks are gaps). */
export function indexChain(chain: readonly Layer[]): LocationIndex<Layer> {
  const runs: Array<{ start: number; end: number; owner: Layer }> = [];
  forEachVisible(chain, (layer, visible) => {
    for (const [start, end] of runsOf(visible)) runs.push({ start, end, owner: layer });
  });
  runs.sort((a, b) => a.start - b.start);
  return LocationIndex.fromSortedRuns(runs);
}

/** Calls `fn` top-down with each layer's written blocks that no layer above it answers for. */
function forEachVisible(chain: readonly Layer[], fn: (layer: Layer, visible: Bitmap) => void): void {
  // Blocks some layer above already answered for; a lower layer's entries for them are hidden.
  let covered: Bitmap | undefined;
  for (let i = 0; i < chain.length; i++) {
    const layer = chain[i]!;
    // Copies only where needed: each one costs per container, and most layers are small.
    fn(layer, covered && !layer.written.isEmpty ? Bitmap.andNot(layer.written, covered) : layer.written);
    if (i === chain.length - 1) break;
    covered ??= new Bitmap();
    if (!layer.written.isEmpty) covered.orInPlace(layer.written);
    if (!layer.trimmed.isEmpty) covered.orInPlace(layer.trimmed);
  }
}
