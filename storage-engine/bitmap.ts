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
