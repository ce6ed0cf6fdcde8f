/** Thin helpers over roaring bitmaps of block indexes, and their on-disk (portable) form. */
import roaring from 'roaring';

export const Bitmap = roaring.RoaringBitmap32;
export type Bitmap = InstanceType<typeof roaring.RoaringBitmap32>;

/** Portable serialization, interoperable with other roaring implementations; null for an empty set. */
export function encodeBitmap(bitmap: Bitmap): Uint8Array | null {
  if (bitmap.isEmpty) return null;
  bitmap.runOptimize();
  return bitmap.serialize('portable');
}

/** Inverse of encodeBitmap. */
export function decodeBitmap(data: Buffer | Uint8Array | null | undefined): Bitmap {
  if (!data || data.length === 0) return new Bitmap();
  return Bitmap.deserialize(data, 'portable');
}

/** Union of many bitmaps as a new bitmap. Empty inputs are skipped: each copy costs per container. */
export function unionOf(bitmaps: readonly Bitmap[]): Bitmap {
  const nonEmpty = bitmaps.filter((b) => !b.isEmpty);
  if (nonEmpty.length === 0) return new Bitmap();
  if (nonEmpty.length === 1) return nonEmpty[0]!.clone();
  return Bitmap.orMany(nonEmpty);
}

/** Blocks of `bitmap` below `limit` are kept; the rest are removed (in place). */
export function clipBelow(bitmap: Bitmap, limit: number): Bitmap {
  if (limit < 2 ** 32 && !bitmap.isEmpty && bitmap.maximum() >= limit) bitmap.removeRange(limit, 2 ** 32);
  return bitmap;
}

const PAGE = 8192;
const LIMIT = 2 ** 32;

/**
 * Each maximal run of consecutive values as [start, end), in order, from the value at rank `fromIndex`. Cost
 * follows the runs, not the values: a page that ends inside a run jumps to the run's end with range probes.
 */
export function* runsOf(bitmap: Bitmap, fromIndex = 0): Generator<[number, number]> {
  const total = bitmap.size;
  const page = new Uint32Array(PAGE);
  let index = fromIndex;
  let runStart = -1;
  let runEnd = -1;
  while (index < total) {
    const values = bitmap.rangeUint32Array(page, index, PAGE);
    const n = values.length;
    if (n === 0) break;
    for (let i = 0; i < n; i++) {
      const v = values[i]!;
      if (v === runEnd) {
        runEnd = v + 1;
        continue;
      }
      if (runStart >= 0) yield [runStart, runEnd];
      runStart = v;
      runEnd = v + 1;
    }
    index += n;
    if (runEnd - runStart >= PAGE) {
      runEnd = extendRun(bitmap, runEnd);
      index = bitmap.rank(runEnd - 1);
    }
  }
  if (runStart >= 0) yield [runStart, runEnd];
}

/** Given that values [.., end) are all present, finds the exclusive end of that run in O(log length) probes. */
export function extendRun(bitmap: Bitmap, end: number): number {
  let lo = end; // every value before lo is in the run
  let step = 1;
  while (lo < LIMIT) {
    const next = Math.min(lo + step, LIMIT);
    if (!bitmap.hasRange(lo, next)) {
      // The run stops inside [lo, next): binary search for its first absent value.
      let hi = next;
      while (hi - lo > 1) {
        const mid = lo + Math.floor((hi - lo) / 2);
        if (bitmap.hasRange(lo, mid)) lo = mid;
        else hi = mid;
      }
      return lo;
    }
    lo = next;
    step *= 2;
  }
  return lo;
}
