/**
 * What a chain of backups leaves on the volume, worked out before anything is written: each manifest's
 * extents laid over those of the backups before it, the later winning, cut at the restored capacity. A
 * restore then writes every byte once, in volume order, instead of replaying each backup over the last
 * (which writes the full backup's bytes only to overwrite those an incremental changed).
 */
import type { Manifest } from './manifest.js';

/**
 * `length` bytes of the volume at `offset`, held from byte `chunkOffset` on in the chunk named `hash`, as
 * stored by backup `backup`.
 */
export interface Placed {
  offset: number;
  length: number;
  hash: string;
  chunkOffset: number;
  backup: string;
}

/** The part of `p` from volume byte `from` to `to` (within it). */
function slice(p: Placed, from: number, to: number): Placed {
  return { ...p, offset: from, length: to - from, chunkOffset: p.chunkOffset + (from - p.offset) };
}

/**
 * The chain's stored ranges as the last backup sees them: sorted, not overlapping, each from the latest
 * backup in `chain` (oldest first) that stored it, none reaching past `capacity`. Ranges no backup stored
 * are absent (zeros). Each manifest's extents are sorted and disjoint (parseManifest checks), so laying
 * one over the result so far is a single merge.
 */
export function layChain(chain: readonly Manifest[], capacity: number): Placed[] {
  let laid: Placed[] = [];
  for (const m of chain) {
    const out: Placed[] = [];
    let i = 0;
    // The earlier range under the cursor, possibly already cut at its start by an extent of `m`.
    let cur: Placed | undefined = laid[0];
    for (const [offset, length, hash, chunkOffset] of m.extents) {
      // Every extent is cut at the restored capacity as it is laid, so nothing laid reaches past it.
      if (offset >= capacity) break;
      const end = Math.min(offset + length, capacity);
      // Earlier ranges wholly before this extent stay.
      while (cur && cur.offset + cur.length <= offset) {
        out.push(cur);
        cur = laid[++i];
      }
      // One that starts before it keeps its head.
      if (cur && cur.offset < offset) out.push(slice(cur, cur.offset, offset));
      // Ranges it covers go; one that reaches past it keeps its tail.
      while (cur && cur.offset + cur.length <= end) cur = laid[++i];
      if (cur && cur.offset < end) cur = slice(cur, end, cur.offset + cur.length);
      out.push({ offset, length: end - offset, hash, chunkOffset, backup: m.id });
    }
    while (cur) {
      out.push(cur);
      cur = laid[++i];
    }
    laid = out;
  }
  return laid;
}
