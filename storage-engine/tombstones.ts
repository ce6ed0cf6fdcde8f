/**
 * Change records of deleted snapshots (invariant 8). Deleting a snapshot drops its record, and compaction
 * later merges its layer into the one above; a backup tool that kept only the snapshot's ID must still be
 * able to ask "what changed since then". A tombstone keeps exactly that, as bits and no data:
 *
 *   changed  the blocks written or trimmed after the deleted snapshot, up to and including `anchor`
 *   anchor   a layer still in the store; layers above it answer for changes after it as usual
 *
 * so delta(deleted, target) = changed ∪ (bits of the layers between anchor and target). A tombstone starts
 * at the deleted snapshot's own layer with nothing changed. When compaction merges the anchor into the layer
 * above, that layer's own bits (before the merge) are added and the anchor moves up: the answer stays
 * exact. When the anchor is dropped (nothing is above it), no later snapshot can name it, and the tombstone
 * goes. Past retention (age, or count per volume) its bits are dropped and the answer is "take a full backup".
 */
import { Bitmap } from './bitmap.js';

export interface Tombstone {
  snapshotId: string;
  sourceVolumeId: string;
  anchorLayerId: number;
  /** Changes in (deleted snapshot, anchor]; null once expired. */
  changed: Bitmap | null;
  capacityBytes: number;
  blockSize: number;
  deletedAtMs: number;
}

/** How long deleted snapshots stay usable as a delta base. */
export interface TombstoneRetention {
  /** Milliseconds after deletion. */
  maxAgeMs: number;
  /** Most usable tombstones per source volume (the oldest expire first). */
  maxPerVolume: number;
}

export const DEFAULT_TOMBSTONE_RETENTION: TombstoneRetention = {
  maxAgeMs: 30 * 24 * 3600 * 1000,
  maxPerVolume: 256,
};

export class Tombstones {
  private readonly byId = new Map<string, Tombstone>();

  constructor(readonly retention: TombstoneRetention) {}

  get size(): number {
    return this.byId.size;
  }

  add(t: Tombstone): void {
    this.byId.set(t.snapshotId, t);
  }

  get(snapshotId: string): Tombstone | undefined {
    return this.byId.get(snapshotId);
  }

  remove(snapshotId: string): void {
    this.byId.delete(snapshotId);
  }

  /** Whether a tombstone can still answer a delta at `nowMs`. */
  usable(t: Tombstone, nowMs: number): boolean {
    return t.changed !== null && nowMs - t.deletedAtMs <= this.retention.maxAgeMs;
  }

  /** Tombstones anchored at a layer. */
  anchoredAt(layerId: number): Tombstone[] {
    const out: Tombstone[] = [];
    for (const t of this.byId.values()) if (t.anchorLayerId === layerId) out.push(t);
    return out;
  }

  /** Usable tombstones of one volume past its count limit, oldest first: these expire now. */
  overCount(sourceVolumeId: string): Tombstone[] {
    const usable = [...this.byId.values()].filter((t) => t.sourceVolumeId === sourceVolumeId && t.changed !== null);
    usable.sort((a, b) => a.deletedAtMs - b.deletedAtMs);
    return usable.slice(0, Math.max(0, usable.length - this.retention.maxPerVolume));
  }

  /**
   * The anchors' moves for a merge of `lower` into `upper`, whose own bits before the merge are
   * `upperChanged`: each tombstone anchored at `lower` gains them and moves to `upper`. Returns the
   * tombstones to persist; apply them with `applyMove` once the transaction committed.
   */
  planMerge(lower: number, upperChanged: Bitmap): Array<{ tombstone: Tombstone; changed: Bitmap | null }> {
    return this.anchoredAt(lower).map((t) => ({
      tombstone: t,
      changed: t.changed === null ? null : Bitmap.or(t.changed, upperChanged),
    }));
  }

  applyMove(t: Tombstone, anchorLayerId: number, changed: Bitmap | null): void {
    t.anchorLayerId = anchorLayerId;
    t.changed = changed;
  }
}
