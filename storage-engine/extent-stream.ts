/**
 * Turns a set of block indexes into byte extents, lazily and in batches. The set is captured when the
 * query starts (layers only ever gain equivalent bits through compaction), so the stream is a
 * consistent answer even while the volume keeps changing.
 *
 * Cost is proportional to the extents produced: values are paged out of the bitmap a chunk at a time,
 * and a run that fills a chunk is extended with range probes instead of value by value.
 */
import { type Bitmap, extendRun } from './bitmap.js';
import type { Extent, ExtentStyle } from './types.js';

/** An async stream of extent batches, with the facts a metadata response needs up front. */
export interface ExtentStream extends AsyncIterable<Extent[]> {
  /** Capacity of the snapshot the extents describe. */
  readonly capacityBytes: number;
  readonly blockSize: number;
  readonly style: ExtentStyle;
}

const PAGE = 8192;

/** Default extents per batch. */
export const DEFAULT_BATCH_SIZE = 4096;

export function extentStream(
  blocks: Bitmap,
  params: {
    capacityBytes: number;
    blockSize: number;
    style: ExtentStyle;
    batchSize: number;
    startingOffset: number;
  },
): ExtentStream {
  const { capacityBytes, blockSize, style, batchSize } = params;
  const firstBlock = Math.floor(params.startingOffset / blockSize);
  return {
    capacityBytes,
    blockSize,
    style,
    [Symbol.asyncIterator]: () =>
      (style === 'FIXED'
        ? fixed(blocks, firstBlock, blockSize, batchSize)
        : variable(blocks, firstBlock, blockSize, batchSize))[Symbol.asyncIterator](),
  };
}

/** Index (rank position) of the first value >= block. */
function firstIndexAtOrAfter(blocks: Bitmap, block: number): number {
  return block === 0 ? 0 : blocks.rank(block - 1);
}

async function* fixed(
  blocks: Bitmap,
  firstBlock: number,
  blockSize: number,
  batchSize: number,
): AsyncGenerator<Extent[]> {
  const total = blocks.size;
  let index = firstIndexAtOrAfter(blocks, firstBlock);
  const page = new Uint32Array(Math.min(PAGE, Math.max(batchSize, 1)));
  let batch: Extent[] = [];
  while (index < total) {
    const values = blocks.rangeUint32Array(page, index, page.length);
    if (values.length === 0) break;
    index += values.length;
    for (let i = 0; i < values.length; i++) {
      batch.push({ offset: values[i]! * blockSize, length: blockSize });
      if (batch.length === batchSize) {
        yield batch;
        batch = [];
      }
    }
  }
  if (batch.length > 0) yield batch;
}

/** The run-merging loop of bitmap.ts runsOf, inlined: a generator per run costs 3x on this hot path. */
async function* variable(
  blocks: Bitmap,
  firstBlock: number,
  blockSize: number,
  batchSize: number,
): AsyncGenerator<Extent[]> {
  const total = blocks.size;
  let index = firstIndexAtOrAfter(blocks, firstBlock);
  const page = new Uint32Array(PAGE);
  let batch: Extent[] = [];
  let runStart = -1;
  let runEnd = -1; // exclusive
  const emit = (start: number, end: number): Extent[] | undefined => {
    batch.push({ offset: start * blockSize, length: (end - start) * blockSize });
    if (batch.length === batchSize) {
      const full = batch;
      batch = [];
      return full;
    }
    return undefined;
  };
  while (index < total) {
    const values = blocks.rangeUint32Array(page, index, page.length);
    const n = values.length;
    if (n === 0) break;
    for (let i = 0; i < n; i++) {
      const v = values[i]!;
      if (v === runEnd) {
        runEnd = v + 1;
        continue;
      }
      if (runStart >= 0) {
        const full = emit(runStart, runEnd);
        if (full) yield full;
      }
      runStart = v;
      runEnd = v + 1;
    }
    index += n;
    // A page that ended inside a run: jump to the run's end with range probes, not value by value.
    if (runEnd - runStart >= PAGE) {
      runEnd = extendRun(blocks, runEnd);
      index = blocks.rank(runEnd - 1);
    }
  }
  if (runStart >= 0) {
    const full = emit(runStart, runEnd);
    if (full) yield full;
  }
  if (batch.length > 0) yield batch;
}
